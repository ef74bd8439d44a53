//! The node's persistent identity: an ed25519 key in `<data>/identity.key` (mode 0600),
//! created on first use. Its public half is the node's libp2p `PeerId`.

use std::io::Write;
use std::path::Path;

use beacon_proto::Keypair;

/// Loads the key at `path`, or creates it (mode 0600) if there is none.
pub fn load_or_create(path: &Path) -> anyhow::Result<Keypair> {
    use anyhow::Context;
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_secret_bytes(&bytes)
            .with_context(|| format!("{} is not a Beacon identity key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let key = Keypair::generate();
            let tmp = path.with_extension("key.tmp");
            let mut f =
                open_private(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&key.secret_bytes()[..])?;
            f.sync_all()?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, b"short").unwrap();
        assert!(load_or_create(&path).is_err());
    }
}

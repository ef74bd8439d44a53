//! A persistent identity: an ed25519 key in a file of mode 0600, created on first use. Its
//! public half is the node's or router's libp2p `PeerId`. One implementation for both, and
//! for the other private files they keep (a generated API token).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use beacon_proto::Keypair;

use crate::NetError;

/// Loads the key at `path`, or creates it if there is none (see [`load_or_create_private`]).
pub fn load_or_create(path: &Path) -> Result<Keypair, NetError> {
    let bytes = load_or_create_private(path, || Keypair::generate().secret_bytes().to_vec())?;
    Keypair::from_secret_bytes(&bytes)
        .map_err(|e| NetError::Identity(format!("{} is not an identity key: {e}", path.display())))
}

/// The contents of the private file at `path` (a key, a token), or `make()`'s, written
/// there first when there is no file. Creating never follows or reuses a file someone placed
/// there (the temporary file is created exclusively, mode 0600), and a file that others may
/// read is refused on load: what it holds may already have leaked.
pub fn load_or_create_private(
    path: &Path,
    make: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, NetError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        NetError::Identity(format!("{what} {}: {e}", path.display()))
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(NetError::Identity(format!(
                    "{} has mode {mode:o}: others may read it; `chmod 600` it \
                     (or delete it to have a new one made)",
                    path.display()
                )));
            }
            std::fs::read(path).map_err(|e| fail("reading", &e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail("creating the folder of", &e))?;
            }
            let bytes = make();
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = std::path::PathBuf::from(tmp);
            // A leftover (or planted) temporary file or link is removed, never written
            // through: `create_new` fails on anything that exists, links included.
            match std::fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail("removing a stale temporary file for", &e)),
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| fail("creating", &e))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| fail("writing", &e))?;
            std::fs::rename(&tmp, path).map_err(|e| fail("writing", &e))?;
            Ok(bytes)
        }
        Err(e) => Err(fail("reading", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Review L5: the temporary file was opened with create+truncate, so a link planted
    /// at its name made the new key land in (and keep the mode of) the link's target; and
    /// a key readable by others was loaded as if private.
    #[test]
    fn a_planted_link_is_not_followed_and_readable_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let target = dir.path().join("world-readable");
        std::fs::write(&target, b"").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&target, path.with_extension("key.tmp")).unwrap();
        let key = load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"",
            "the key went through the link"
        );
        assert!(
            !std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(load_or_create(&path).unwrap().peer_id(), key.peer_id());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}

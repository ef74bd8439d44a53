//! Length-prefixed frames on a QUIC stream: a 4-byte big-endian length, then the message's
//! [`Wire`] encoding. The length is checked against the message kind's limit before any
//! buffer is allocated.

use beacon_proto::Wire;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::NetError;

/// Writes one frame.
pub async fn write_frame<T: Wire, W: AsyncWrite + Unpin>(
    out: &mut W,
    value: &T,
) -> Result<(), NetError> {
    let bytes = value.encode()?;
    let len =
        u32::try_from(bytes.len()).map_err(|_| NetError::Protocol("frame too large".into()))?;
    // One write: on a QUIC stream each write may leave as a packet of its own.
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&bytes);
    out.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly before a new frame began.
pub async fn read_frame<T: Wire, R: AsyncRead + Unpin>(
    input: &mut R,
) -> Result<Option<T>, NetError> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > T::MAX_BYTES {
        return Err(NetError::Protocol(format!(
            "{} frame of {len} bytes is over the {}-byte limit",
            T::KIND,
            T::MAX_BYTES
        )));
    }
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NetError::Protocol(format!("{} frame cut short", T::KIND))
        } else {
            e.into()
        }
    })?;
    Ok(Some(T::decode(&buf)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use beacon_proto::{DataError, DataErrorCode, DataFrame};

    #[tokio::test]
    async fn round_trip_and_bounds() {
        let frame = DataFrame::Error(DataError {
            code: DataErrorCode::Busy,
            message: "queue full".into(),
            retry_after_ms: Some(500),
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &frame).await.unwrap();
        write_frame(&mut buf, &DataFrame::Delta("hi".into()))
            .await
            .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame::<DataFrame, _>(&mut r).await.unwrap(),
            Some(frame)
        );
        assert_eq!(
            read_frame::<DataFrame, _>(&mut r).await.unwrap(),
            Some(DataFrame::Delta("hi".into()))
        );
        assert_eq!(read_frame::<DataFrame, _>(&mut r).await.unwrap(), None);

        // A length over the limit is refused before allocating.
        let huge = (u32::MAX).to_be_bytes();
        assert!(matches!(
            read_frame::<DataFrame, _>(&mut &huge[..]).await,
            Err(NetError::Protocol(_))
        ));
        // A frame cut short is an error, not a clean end.
        let cut = &buf[..buf.len() - 1];
        let mut r = cut;
        read_frame::<DataFrame, _>(&mut r).await.unwrap();
        assert!(read_frame::<DataFrame, _>(&mut r).await.is_err());
        // Garbage of a plausible length is malformed, not a panic.
        let mut garbage = 8u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 8]);
        assert!(read_frame::<DataFrame, _>(&mut &garbage[..]).await.is_err());
    }
}

//! Hand-made PNG bytes for tests of the image limits: headers that claim any size, and
//! header rewrites with valid chunk checksums.

/// A PNG whose header claims `w` x `h` RGB pixels and that holds no pixel data at all
/// (what a decompression bomb's header looks like before any pixel is decoded).
pub fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[]);
    chunk(b"IEND", &[]);
    out
}

/// Rewrites the width and height a PNG's header claims (the IHDR chunk right after the
/// signature), with its checksum fixed; the pixel data stays as it was. Shorter input is
/// left alone.
pub fn set_png_dims(bytes: &mut [u8], w: u32, h: u32) {
    if bytes.len() >= 33 {
        bytes[16..20].copy_from_slice(&w.to_be_bytes());
        bytes[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32fast::hash(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_header_claims_the_size_with_valid_checksums() {
        let mut png = super::png_header_only(640, 480);
        assert_eq!(&png[16..24], &[0, 0, 2, 128, 0, 0, 1, 224]);
        // The IHDR checksum is the standard CRC-32 of its type and data.
        assert_eq!(&png[29..33], &crc32fast::hash(&png[12..29]).to_be_bytes());
        super::set_png_dims(&mut png, 1, 2);
        assert_eq!(&png[16..24], &[0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&png[29..33], &crc32fast::hash(&png[12..29]).to_be_bytes());
    }
}

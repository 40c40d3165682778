//! Encoding and decoding single images (PNG, JPEG) to and from raw 8-bit pixels.

use std::io::Cursor;

/// Raw 8-bit pixels, row-major, channels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    pub data: Vec<u8>,
}

/// Encodes pixels as PNG (the dataset table's canonical encoding: lossless, small for 28×28).
pub fn encode_png(p: &Pixels) -> Result<Vec<u8>, image::ImageError> {
    let color = match p.channels {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        c => panic!("encode_png: {c} channels"),
    };
    let mut out = Vec::with_capacity(p.data.len() / 2 + 64);
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &p.data,
        p.width as u32,
        p.height as u32,
        color,
    )?;
    Ok(out)
}

/// Decodes PNG or JPEG bytes to `channels` channels (gray is replicated to RGB; RGB is converted
/// to luma for gray).
pub fn decode(bytes: &[u8], channels: usize) -> Result<Pixels, image::ImageError> {
    let img = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(image::ImageError::IoError)?
        .decode()?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = match channels {
        1 => img.into_luma8().into_raw(),
        3 => img.into_rgb8().into_raw(),
        c => panic!("decode: {c} channels"),
    };
    Ok(Pixels {
        width,
        height,
        channels,
        data,
    })
}

/// The number of channels an encoded image has natively (1 for gray, 3 for colour).
pub fn native_channels(bytes: &[u8]) -> Result<usize, image::ImageError> {
    let img = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(image::ImageError::IoError)?
        .decode()?;
    Ok(if img.color().has_color() { 3 } else { 1 })
}

/// Resizes to `width`×`height` (bilinear), keeping the channel count.
pub fn resize(p: &Pixels, width: usize, height: usize) -> Pixels {
    if p.width == width && p.height == height {
        return p.clone();
    }
    let data = match p.channels {
        1 => {
            let img = image::GrayImage::from_raw(p.width as u32, p.height as u32, p.data.clone())
                .expect("buffer matches dimensions");
            image::imageops::resize(
                &img,
                width as u32,
                height as u32,
                image::imageops::FilterType::Triangle,
            )
            .into_raw()
        }
        _ => {
            let img = image::RgbImage::from_raw(p.width as u32, p.height as u32, p.data.clone())
                .expect("buffer matches dimensions");
            image::imageops::resize(
                &img,
                width as u32,
                height as u32,
                image::imageops::FilterType::Triangle,
            )
            .into_raw()
        }
    };
    Pixels {
        width,
        height,
        channels: p.channels,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_is_lossless() {
        for channels in [1, 3] {
            let p = Pixels {
                width: 5,
                height: 3,
                channels,
                data: (0..15 * channels).map(|i| (i * 17 % 256) as u8).collect(),
            };
            let bytes = encode_png(&p).unwrap();
            assert_eq!(decode(&bytes, channels).unwrap(), p);
            assert_eq!(native_channels(&bytes).unwrap(), channels);
        }
    }

    #[test]
    fn corrupt_bytes_are_an_error() {
        assert!(decode(b"\x89PNG\r\n\x1a\nnot really", 1).is_err());
        assert!(decode(b"", 1).is_err());
    }
}

//! The hand-over's binary encoding: little-endian integers and
//! length-prefixed byte strings. Every length is checked against a bound
//! and against what is left of the message before anything is allocated:
//! the peer is our own binary, but a corrupt stream must not make it
//! allocate without limit.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("hand-over message ends early (reading {0})")]
    Short(&'static str),
    #[error("{what} of {len} bytes is above the limit of {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("unknown {what} {value}")]
    Unknown { what: &'static str, value: u64 },
}

/// Builds one message.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }

    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }
}

/// Reads one message.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Short(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A byte string of at most `max` bytes (borrowed: no allocation).
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(DecodeError::TooLong { what, len, max });
        }
        self.take(len, what)
    }

    pub fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(what, max)?).map_err(|_| DecodeError::Utf8(what))
    }

    /// A count of items of at least `min_item` bytes each, at most `max`
    /// and no more than the rest of the message could hold: a caller can
    /// reserve room for them.
    pub fn count(&mut self, what: &'static str, max: usize, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        let fits = self.buf.len() / min_item.max(1);
        if n > max || n > fits {
            return Err(DecodeError::TooLong { what, len: n, max: max.min(fits) });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let mut w = Writer::default();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.str("five");
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.u32("c"), Ok(3));
        assert_eq!(r.u64("d"), Ok(4));
        assert_eq!(r.str("e", 4), Ok("five"));
        assert!(r.is_empty());
        let mut r = Reader::new(&w.buf[15..]);
        assert!(matches!(r.str("e", 3), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn a_corrupt_length_allocates_nothing() {
        // A count claiming four billion items in a 4-byte message.
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(r.count("items", usize::MAX, 1).is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0x7f, 1, 2]);
        assert!(r.bytes("blob", usize::MAX).is_err());
    }
}

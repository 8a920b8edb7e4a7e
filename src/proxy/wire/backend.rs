//! Views of the server messages keyshift reads: ReadyForQuery, ErrorResponse, and the
//! descriptions a client is told (ParameterDescription, RowDescription).

use super::tag::backend as t;
use super::{Reader, WireError};

/// Transaction status of a `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

/// `ReadyForQuery`.
pub fn ready_for_query(msg: &[u8]) -> Result<TxStatus, WireError> {
    let mut r = Reader::body(msg, t::READY_FOR_QUERY, "ReadyForQuery")?;
    let s = r.u8()?;
    r.end()?;
    TxStatus::from_byte(s).ok_or(WireError::Invalid("ReadyForQuery", "unknown status"))
}

/// `ErrorResponse` or `NoticeResponse`: typed fields, each a code byte and a string.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    body: &'a [u8],
}

impl<'a> Fields<'a> {
    /// An ErrorResponse (`E`) or NoticeResponse (`N`), checked to be well formed.
    pub fn read(msg: &'a [u8]) -> Result<Self, WireError> {
        let tag = match msg.first() {
            Some(&t::ERROR_RESPONSE) => t::ERROR_RESPONSE,
            Some(&t::NOTICE_RESPONSE) => t::NOTICE_RESPONSE,
            _ => return Err(WireError::WrongTag("ErrorResponse")),
        };
        let r = Reader::body(msg, tag, "ErrorResponse")?;
        let body = r.rest();
        let mut check = r;
        loop {
            if check.u8()? == 0 {
                check.end()?;
                break;
            }
            check.cstr()?;
        }
        Ok(Fields { body })
    }

    /// The field with this code (`C` SQLSTATE, `M` message, `V` severity, …).
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        let mut r = Reader {
            buf: self.body,
            what: "ErrorResponse",
        };
        loop {
            let c = r.u8().ok()?;
            if c == 0 {
                return None;
            }
            let v = r.cstr().ok()?;
            if c == code {
                return Some(v);
            }
        }
    }

    /// Every field, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let mut r = Reader {
            buf: self.body,
            what: "ErrorResponse",
        };
        std::iter::from_fn(move || {
            let c = r.u8().ok().filter(|&c| c != 0)?;
            Some((c, r.cstr().ok()?))
        })
    }

    pub fn sqlstate(&self) -> Option<&'a [u8]> {
        self.get(b'C')
    }

    pub fn message(&self) -> Option<&'a [u8]> {
        self.get(b'M')
    }

    /// FATAL or PANIC: PostgreSQL closes the connection after it. `V` is the severity that is
    /// never translated; `S` stands in for it from servers older than 9.6.
    pub fn ends_session(&self) -> bool {
        matches!(
            self.get(b'V').or_else(|| self.get(b'S')),
            Some(b"FATAL" | b"PANIC")
        )
    }
}

/// `ParameterDescription`: the parameter type OIDs a client is told.
pub fn parameter_types(msg: &[u8]) -> Result<Vec<u32>, WireError> {
    let mut r = Reader::body(msg, t::PARAMETER_DESCRIPTION, "ParameterDescription")?;
    let n = r.i16()? as u16;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        out.push(r.i32()? as u32);
    }
    r.end()?;
    Ok(out)
}

/// One column of a `RowDescription`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column<'a> {
    pub name: &'a [u8],
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_mod: i32,
    pub format: i16,
}

/// `RowDescription`: the columns a client is told.
pub fn row_description(msg: &[u8]) -> Result<Vec<Column<'_>>, WireError> {
    let mut r = Reader::body(msg, t::ROW_DESCRIPTION, "RowDescription")?;
    let n = r.i16()? as u16;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        out.push(Column {
            name: r.cstr()?,
            table_oid: r.i32()? as u32,
            attnum: r.i16()?,
            type_oid: r.i32()? as u32,
            type_len: r.i16()?,
            type_mod: r.i32()?,
            format: r.i16()?,
        });
    }
    r.end()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::msg;
    use super::*;

    #[test]
    fn ready() {
        assert_eq!(
            ready_for_query(&msg(b'Z', b"T")),
            Ok(TxStatus::InTransaction)
        );
        assert!(ready_for_query(&msg(b'Z', b"X")).is_err());
        assert!(ready_for_query(&msg(b'Z', b"")).is_err());
        assert!(ready_for_query(&msg(b'Z', b"II")).is_err());
    }

    #[test]
    fn error_fields() {
        let e = msg(b'E', b"SFATAL\0VFATAL\0C08P01\0Mbad\0\0");
        let f = Fields::read(&e).unwrap();
        assert_eq!(f.sqlstate(), Some(&b"08P01"[..]));
        assert_eq!(f.message(), Some(&b"bad"[..]));
        assert!(f.ends_session());
        let e = msg(b'E', b"SERROR\0C42601\0\0");
        assert!(!Fields::read(&e).unwrap().ends_session());
        assert!(Fields::read(&msg(b'E', b"SERROR\0C4")).is_err());
        assert!(Fields::read(&msg(b'E', b"SERROR\0\0x")).is_err());
        assert!(Fields::read(&msg(b'E', b"")).is_err());
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            parameter_types(&msg(b't', b"\0\x02\0\0\0\x17\0\0\x0b\x86")),
            Ok(vec![23, 2950])
        );
        assert!(parameter_types(&msg(b't', b"\0\x02\0\0\0\x17")).is_err());
        let mut body = b"\0\x01id\0".to_vec();
        body.extend_from_slice(&[
            0, 0, 0, 7, 0, 1, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
        ]);
        let m = msg(b'T', &body);
        let cols = row_description(&m).unwrap();
        assert_eq!((cols[0].name, cols[0].type_oid), (&b"id"[..], 23));
        assert!(row_description(&msg(b'T', &body[..body.len() - 1])).is_err());
    }
}

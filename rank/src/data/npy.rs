//! A small reader (and f32 writer) for NumPy `.npy` files: format versions 1, 2 and 3,
//! C order, little-endian (or single-byte) booleans, integers and floats.

use std::path::Path;

use super::{DataError, Dataset};

/// How `import_npy` reads its second file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyKind {
    /// The second file is view b: a paired data set.
    Paired,
    /// The second file holds one integer class per row: a labeled data set.
    Labeled,
}

/// Element values of a parsed array.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    /// From `f4` or `f8` (f8 rounded to f32).
    Float(Vec<f32>),
    /// From `b1`, `i1`..`i8`, `u1`..`u8`.
    Int(Vec<i64>),
}

/// A parsed `.npy` array.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The dtype as written in the header, e.g. `<f4`.
    pub descr: String,
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    /// The values as f32 (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            NpyData::Float(v) => v.clone(),
            NpyData::Int(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

#[derive(Debug, PartialEq)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
    Other,
}

/// Parses the header dictionary, e.g. `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }`.
fn parse_header_dict(text: &str) -> Result<Vec<(String, Value)>, String> {
    let s = text.trim();
    let inner = s
        .strip_prefix('{')
        .and_then(|r| r.trim_end().strip_suffix('}'))
        .ok_or_else(|| format!("header is not a dictionary: {s:?}"))?;
    let chars: Vec<char> = inner.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && (chars[*i].is_whitespace() || chars[*i] == ',') {
            *i += 1;
        }
    };
    let read_str = |i: &mut usize| -> Result<String, String> {
        let q = chars[*i];
        let start = *i + 1;
        let end =
            chars[start..].iter().position(|&c| c == q).ok_or("unterminated string in header")?
                + start;
        *i = end + 1;
        Ok(chars[start..end].iter().collect())
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            break;
        }
        if chars[i] != '\'' && chars[i] != '"' {
            return Err(format!("unexpected {:?} in header {s:?}", chars[i]));
        }
        let key = read_str(&mut i)?;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() || chars[i] != ':' {
            return Err(format!("missing ':' after '{key}' in header"));
        }
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() {
            return Err(format!("missing value for '{key}' in header"));
        }
        let value = match chars[i] {
            '\'' | '"' => Value::Str(read_str(&mut i)?),
            '(' => {
                let end =
                    chars[i..].iter().position(|&c| c == ')').ok_or("unterminated shape tuple")?
                        + i;
                let body: String = chars[i + 1..end].iter().collect();
                i = end + 1;
                let mut dims = Vec::new();
                for part in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let part = part.strip_suffix('L').unwrap_or(part);
                    dims.push(
                        part.parse::<usize>().map_err(|_| format!("bad shape entry {part:?}"))?,
                    );
                }
                Value::Tuple(dims)
            }
            '[' | '{' => {
                // Structured dtypes: skip to the matching bracket.
                let (open, close) = if chars[i] == '[' { ('[', ']') } else { ('{', '}') };
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == open {
                        depth += 1;
                    } else if chars[i] == close {
                        depth -= 1;
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    i += 1;
                }
                Value::Other
            }
            _ => {
                let start = i;
                while i < chars.len() && chars[i] != ',' {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                match word.trim() {
                    "True" => Value::Bool(true),
                    "False" => Value::Bool(false),
                    _ => Value::Other,
                }
            }
        };
        out.push((key, value));
    }
    Ok(out)
}

fn le_chunks<const N: usize>(body: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    body.chunks_exact(N).map(|c| {
        let mut w = [0u8; N];
        w.copy_from_slice(c);
        w
    })
}

fn parse_inner(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (missing the \\x93NUMPY magic)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => {
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        _ => {
            return Err(format!(
                "unsupported .npy format version {major}.{minor} (1.0, 2.0 and 3.0 are read)"
            ));
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated .npy header")?;
    let text = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text")?;
    let dict = parse_header_dict(text)?;
    let get = |k: &str| dict.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let descr = match get("descr") {
        Some(Value::Str(d)) => d.clone(),
        Some(_) => {
            return Err(
                "structured or record dtypes are not supported; save a plain numeric array".into(),
            );
        }
        None => return Err("header has no 'descr'".into()),
    };
    match get("fortran_order") {
        Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(
                "Fortran-order array; save it in C order (np.save(f, np.ascontiguousarray(x)))"
                    .into(),
            );
        }
        _ => return Err("header has no valid 'fortran_order'".into()),
    }
    let shape = match get("shape") {
        Some(Value::Tuple(s)) => s.clone(),
        _ => return Err("header has no valid 'shape'".into()),
    };
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape too large")?;
    let mut dc = descr.chars();
    let order = dc.next().ok_or("empty descr")?;
    let code: String = dc.collect();
    let size: usize = code
        .get(1..)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unsupported dtype {descr:?}"))?;
    let little = match order {
        '<' | '|' => true,
        '=' => cfg!(target_endian = "little"),
        '>' => size == 1,
        _ => false,
    };
    if !little {
        return Err(format!(
            "big-endian dtype {descr:?} is not supported; convert with x.astype('<{code}')"
        ));
    }
    let body = &bytes[end..];
    let need = count.checked_mul(size).ok_or("shape too large")?;
    if body.len() < need {
        return Err(format!(
            "truncated data: shape {shape:?} of {descr} needs {need} bytes, the file has {}",
            body.len()
        ));
    }
    if body.len() > need {
        return Err(format!(
            "{} bytes after the data of shape {shape:?} ({descr}); the file is damaged",
            body.len() - need
        ));
    }
    let data = match code.as_str() {
        "f4" => NpyData::Float(le_chunks::<4>(body).map(f32::from_le_bytes).collect()),
        "f8" => {
            NpyData::Float(le_chunks::<8>(body).map(|w| f64::from_le_bytes(w) as f32).collect())
        }
        "b1" | "u1" => NpyData::Int(body.iter().map(|&b| b as i64).collect()),
        "i1" => NpyData::Int(body.iter().map(|&b| b as i8 as i64).collect()),
        "i2" => NpyData::Int(le_chunks::<2>(body).map(|w| i16::from_le_bytes(w) as i64).collect()),
        "u2" => NpyData::Int(le_chunks::<2>(body).map(|w| u16::from_le_bytes(w) as i64).collect()),
        "i4" => NpyData::Int(le_chunks::<4>(body).map(|w| i32::from_le_bytes(w) as i64).collect()),
        "u4" => NpyData::Int(le_chunks::<4>(body).map(|w| u32::from_le_bytes(w) as i64).collect()),
        "i8" => NpyData::Int(le_chunks::<8>(body).map(i64::from_le_bytes).collect()),
        "u8" => {
            let v: Vec<u64> = le_chunks::<8>(body).map(u64::from_le_bytes).collect();
            if v.iter().any(|&x| x > i64::MAX as u64) {
                return Err("uint64 value above 2^63-1".into());
            }
            NpyData::Int(v.into_iter().map(|x| x as i64).collect())
        }
        _ => {
            return Err(format!(
                "unsupported dtype {descr:?} (supported: f4, f8, b1, i1, i2, i4, i8, u1, u2, u4, u8)"
            ));
        }
    };
    Ok(NpyArray { descr, shape, data })
}

/// Parses the bytes of a `.npy` file; `origin` names it in errors.
pub fn parse_npy(bytes: &[u8], origin: &Path) -> Result<NpyArray, DataError> {
    parse_inner(bytes).map_err(|reason| DataError::Npy { path: origin.to_path_buf(), reason })
}

fn read_npy(path: &Path) -> Result<NpyArray, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io("read", path, e))?;
    parse_npy(&bytes, path)
}

fn matrix(arr: &NpyArray, path: &Path, what: &str) -> Result<(usize, usize, Vec<f32>), DataError> {
    let err = |reason: String| DataError::Npy { path: path.to_path_buf(), reason };
    let (rows, cols) = match arr.shape[..] {
        [r, c] => (r, c),
        _ => {
            return Err(err(format!(
                "{what} must be a 2-D array (rows, features), found shape {:?}; reshape it, e.g. x.reshape(len(x), -1)",
                arr.shape
            )));
        }
    };
    let values = arr.to_f32();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(err(format!(
            "{what}: non-finite value at row {}, column {}",
            i / cols.max(1),
            i % cols.max(1)
        )));
    }
    Ok((rows, cols, values))
}

/// Reads a data set from `.npy` files: features `a` (rows x dim) and either view b (rows x
/// dim_b) or integer labels (shape (rows,) or (rows, 1), values in 0..2^32; the class count is
/// the largest label + 1).
pub fn import_npy(a: &Path, b_or_labels: &Path, kind: NpyKind) -> Result<Dataset, DataError> {
    let xa = read_npy(a)?;
    let (rows, dim_a, fa) = matrix(&xa, a, "features")?;
    let xb = read_npy(b_or_labels)?;
    let err = |reason: String| DataError::Npy { path: b_or_labels.to_path_buf(), reason };
    let name = a.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let data = match kind {
        NpyKind::Paired => {
            let (rows_b, dim_b, fb) = matrix(&xb, b_or_labels, "view b")?;
            if rows_b != rows {
                return Err(err(format!(
                    "view b has {rows_b} rows but view a ({}) has {rows}",
                    a.display()
                )));
            }
            Dataset::paired(dim_a, dim_b, fa, fb)?
        }
        NpyKind::Labeled => {
            let ok_shape = matches!(xb.shape[..], [n] | [n, 1] if n == rows);
            if !ok_shape {
                return Err(err(format!(
                    "labels must have shape ({rows},) to match the features in {}, found {:?}",
                    a.display(),
                    xb.shape
                )));
            }
            let NpyData::Int(raw) = &xb.data else {
                return Err(err(format!(
                    "labels must be integers, found dtype {}; convert with y.astype('<i8')",
                    xb.descr
                )));
            };
            let mut labels = Vec::with_capacity(raw.len());
            for (i, &l) in raw.iter().enumerate() {
                let l = u32::try_from(l)
                    .map_err(|_| err(format!("label {l} at row {i} is not in 0..2^32")))?;
                labels.push(l);
            }
            let num_classes = labels.iter().max().map_or(1, |&m| m as usize + 1);
            Dataset::labeled(dim_a, num_classes, fa, labels)?
        }
    };
    Ok(data.with_name(name).with_provenance(format!(
        "imported from {} ({}, {:?}) and {} ({}, {:?})",
        file_name(a),
        xa.descr,
        xa.shape,
        file_name(b_or_labels),
        xb.descr,
        xb.shape
    )))
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The bytes of a version-1.0 `.npy` file holding `data` (`<f4`, C order) with `shape`.
pub fn npy_bytes_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let body: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    npy_bytes("<f4", shape, &body)
}

/// The bytes of a version-1.0 `.npy` file holding `data` (`|u1`) with `shape`.
pub fn npy_bytes_u8(shape: &[usize], data: &[u8]) -> Vec<u8> {
    npy_bytes("|u1", shape, data)
}

fn npy_bytes(descr: &str, shape: &[usize], body: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt =
        if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Writes `bytes` (e.g. from [`npy_bytes_f32`]) to `path`.
pub fn write_npy(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    std::fs::write(path, bytes).map_err(|e| DataError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A .npy file built by hand: magic, version, header length, header text, body.
    fn hand_npy(major: u8, header: &str, body: &[u8]) -> Vec<u8> {
        let mut v = b"\x93NUMPY".to_vec();
        v.push(major);
        v.push(0);
        if major == 1 {
            v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            v.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(body);
        v
    }

    fn p() -> &'static Path {
        Path::new("x.npy")
    }

    #[test]
    fn parses_v1_f4_and_v2_f8() {
        let body: Vec<u8> =
            [1.0f32, 2.5, -3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = hand_npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }          \n",
            &body,
        );
        let a = parse_npy(&b, p()).unwrap();
        assert_eq!(a.shape, vec![3, 2]);
        assert_eq!(a.data, NpyData::Float(vec![1.0, 2.5, -3.0, 4.0, 5.0, 6.0]));

        let body: Vec<u8> = [0.5f64, -1.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = hand_npy(
            2,
            "{\"descr\": \"<f8\", \"shape\": (1,2), \"fortran_order\": False}\n",
            &body,
        );
        let a = parse_npy(&b, p()).unwrap();
        assert_eq!(a.shape, vec![1, 2]);
        assert_eq!(a.data, NpyData::Float(vec![0.5, -1.25]));
    }

    #[test]
    fn parses_integer_labels() {
        let b = hand_npy(
            1,
            "{'descr': '|u1', 'fortran_order': False, 'shape': (4,), }\n",
            &[0, 9, 255, 3],
        );
        assert_eq!(parse_npy(&b, p()).unwrap().data, NpyData::Int(vec![0, 9, 255, 3]));
        let b =
            hand_npy(1, "{'descr': '|i1', 'fortran_order': False, 'shape': (2,), }\n", &[0xff, 7]);
        assert_eq!(parse_npy(&b, p()).unwrap().data, NpyData::Int(vec![-1, 7]));
        let body: Vec<u8> = [5i32, -2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = hand_npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }\n", &body);
        assert_eq!(parse_npy(&b, p()).unwrap().data, NpyData::Int(vec![5, -2]));
        let body: Vec<u8> = [1i64 << 40, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = hand_npy(3, "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 1), }\n", &body);
        let a = parse_npy(&b, p()).unwrap();
        assert_eq!((a.shape.clone(), a.data), (vec![2, 1], NpyData::Int(vec![1 << 40, 3])));
    }

    #[test]
    fn unsupported_inputs_are_clear_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"hello world, not numpy".to_vec(), "magic"),
            (hand_npy(9, "{}", &[]), "version 9.0"),
            (
                hand_npy(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", &[0; 4]),
                "big-endian",
            ),
            (
                hand_npy(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }", &[0; 4]),
                "Fortran",
            ),
            (
                hand_npy(1, "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", &[0; 8]),
                "unsupported dtype",
            ),
            (
                hand_npy(
                    1,
                    "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                    &[0; 4],
                ),
                "structured",
            ),
            (
                hand_npy(
                    1,
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                    &[0; 12],
                ),
                "truncated data",
            ),
            (
                hand_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", &[0; 8]),
                "after the data",
            ),
            (hand_npy(1, "{'descr': '<f4', 'fortran_order': False, }", &[]), "'shape'"),
        ];
        for (bytes, want) in cases {
            let e = parse_npy(&bytes, p()).unwrap_err().to_string();
            assert!(e.contains("x.npy") && e.contains(want), "wanted {want:?} in {e}");
        }
        // A header length pointing past the end of the file.
        let mut b = hand_npy(1, "{}", &[]);
        b[8] = 200;
        assert!(parse_npy(&b, p()).unwrap_err().to_string().contains("truncated .npy header"));
    }

    #[test]
    fn import_paired_and_labeled() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.npy");
        let b = dir.path().join("b.npy");
        let y = dir.path().join("y.npy");
        write_npy(&a, &npy_bytes_f32(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).unwrap();
        write_npy(&b, &npy_bytes_f32(&[3, 1], &[7.0, 8.0, 9.0])).unwrap();
        write_npy(&y, &npy_bytes_u8(&[3], &[2, 0, 4])).unwrap();

        let d = import_npy(&a, &b, NpyKind::Paired).unwrap();
        assert_eq!(d.kind(), crate::data::DatasetKind::Paired { dim_a: 2, dim_b: 1 });
        assert_eq!(d.row_a(1), &[3.0, 4.0]);
        assert_eq!(d.row_b(2), &[9.0]);
        assert!(d.provenance().contains("a.npy") && d.provenance().contains("b.npy"));

        let d = import_npy(&a, &y, NpyKind::Labeled).unwrap();
        assert_eq!(d.kind(), crate::data::DatasetKind::Labeled { dim: 2, num_classes: 5 });
        assert_eq!(d.labels(), &[2, 0, 4]);

        // Float labels, mismatched rows, wrong rank, negative labels.
        let e = import_npy(&a, &a, NpyKind::Labeled).unwrap_err().to_string();
        assert!(e.contains("a.npy") && e.contains("shape (3,)") && e.contains("[3, 2]"), "{e}");
        write_npy(&y, &npy_bytes_f32(&[3], &[0.0, 1.0, 2.0])).unwrap();
        let e = import_npy(&a, &y, NpyKind::Labeled).unwrap_err().to_string();
        assert!(e.contains("must be integers"), "{e}");
        write_npy(&b, &npy_bytes_f32(&[2, 1], &[7.0, 8.0])).unwrap();
        let e = import_npy(&a, &b, NpyKind::Paired).unwrap_err().to_string();
        assert!(e.contains("2 rows") && e.contains("3"), "{e}");
        write_npy(&b, &npy_bytes_f32(&[3], &[7.0, 8.0, 9.0])).unwrap();
        let e = import_npy(&b, &y, NpyKind::Labeled).unwrap_err().to_string();
        assert!(e.contains("2-D"), "{e}");
        let body: Vec<u8> = [0i32, -1, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        write_npy(
            &y,
            &hand_npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }\n", &body),
        )
        .unwrap();
        let e = import_npy(&a, &y, NpyKind::Labeled).unwrap_err().to_string();
        assert!(e.contains("label -1 at row 1"), "{e}");
        let e =
            import_npy(&dir.path().join("none.npy"), &y, NpyKind::Labeled).unwrap_err().to_string();
        assert!(e.contains("none.npy"), "{e}");
    }
}

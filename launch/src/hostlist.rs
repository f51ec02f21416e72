//! Slurm hostlist expressions (`SLURM_JOB_NODELIST`), expanded to host names.
//!
//! Grammar, as Slurm writes them: a comma-separated list of items (commas inside brackets
//! belong to the bracket); each item is literal text with any number of bracket groups, e.g.
//! `rack[1-2]-n[01,03-04]`. A bracket group is a comma-separated list of numbers and
//! `LO-HI` ranges; an item with several groups expands to their product, the leftmost group
//! varying slowest (as `scontrol show hostnames` prints them). A range is zero-padded to the
//! width of its lower bound (`n[001-003]` is `n001 n002 n003`; `n[8-10]` is `n8 n9 n10`).
//! Order is kept and duplicates are not removed, as `scontrol show hostnames` does (and
//! `tests/launchers.rs` checks). Text after the last bracket (`n[1-2]-ib`), which Slurm 22.05's
//! scontrol refuses, is kept as a suffix here.

use thiserror::Error;

/// Expanding more names than this is refused (a typo such as `n[0-99999999]`).
pub const MAX_HOSTS: usize = 1 << 20;

/// A malformed hostlist expression.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostlistError {
    #[error("the hostlist names no host")]
    Empty,
    #[error("hostlist {list:?}: '[' at position {pos} is never closed")]
    Unclosed { list: String, pos: usize },
    #[error("hostlist {list:?}: ']' at position {pos} has no matching '['")]
    Unopened { list: String, pos: usize },
    #[error("hostlist {list:?}: nested '[' at position {pos}")]
    Nested { list: String, pos: usize },
    #[error(
        "hostlist {list:?}: bad range {range:?} in brackets ({why}); write numbers or LO-HI \
         ranges separated by commas, e.g. n[01-04,07]"
    )]
    BadRange { list: String, range: String, why: &'static str },
    #[error("hostlist {list:?} expands to more than {MAX_HOSTS} hosts")]
    TooLarge { list: String },
}

/// One piece of an item: literal text or the numbers of a bracket group (already formatted).
enum Piece {
    Text(String),
    Group(Vec<String>),
}

/// Expands a Slurm hostlist expression into host names, in order.
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    let trimmed = list.trim();
    if trimmed.is_empty() {
        return Err(HostlistError::Empty);
    }
    let mut hosts = Vec::new();
    for (start, item) in split_top_level(trimmed)? {
        if item.is_empty() {
            // `a,,b` is `a,b` to Slurm too.
            continue;
        }
        let pieces = parse_item(trimmed, start, item)?;
        expand_item(trimmed, &pieces, &mut hosts)?;
    }
    if hosts.is_empty() {
        return Err(HostlistError::Empty);
    }
    Ok(hosts)
}

/// The first host of a hostlist expression (rank 0's node under Slurm's block distribution).
pub fn first_host(list: &str) -> Result<String, HostlistError> {
    // Expanding everything is cheap for real node lists and validates the whole expression.
    expand(list)?.into_iter().next().ok_or(HostlistError::Empty)
}

/// Splits at commas outside brackets; yields (byte offset, item).
fn split_top_level(list: &str) -> Result<Vec<(usize, &str)>, HostlistError> {
    let mut items = Vec::new();
    let mut depth_open: Option<usize> = None;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' => {
                if depth_open.is_some() {
                    return Err(HostlistError::Nested { list: list.into(), pos: i });
                }
                depth_open = Some(i);
            }
            ']' => {
                let Some(_) = depth_open.take() else {
                    return Err(HostlistError::Unopened { list: list.into(), pos: i });
                };
            }
            ',' if depth_open.is_none() => {
                items.push((start, list[start..i].trim()));
                start = i + 1;
            }
            _ => {}
        }
    }
    if let Some(pos) = depth_open {
        return Err(HostlistError::Unclosed { list: list.into(), pos });
    }
    items.push((start, list[start..].trim()));
    Ok(items)
}

fn parse_item(list: &str, offset: usize, item: &str) -> Result<Vec<Piece>, HostlistError> {
    let mut pieces = Vec::new();
    let mut rest = item;
    let mut at = offset;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_owned()));
        }
        // split_top_level checked that every '[' is closed and nothing nests.
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .ok_or(HostlistError::Unclosed { list: list.into(), pos: at + open })?;
        pieces.push(Piece::Group(parse_group(list, &rest[open + 1..close])?));
        at += close + 1;
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_owned()));
    }
    Ok(pieces)
}

fn parse_group(list: &str, body: &str) -> Result<Vec<String>, HostlistError> {
    let bad = |range: &str, why: &'static str| HostlistError::BadRange {
        list: list.into(),
        range: range.into(),
        why,
    };
    let mut out = Vec::new();
    for part in body.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad(body, "empty element"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (part, part),
        };
        let is_num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !is_num(lo) || !is_num(hi) {
            return Err(bad(part, "not a number or LO-HI range"));
        }
        let parse = |s: &str| s.parse::<u64>().map_err(|_| bad(part, "number too large"));
        let (l, h) = (parse(lo)?, parse(hi)?);
        if h < l {
            return Err(bad(part, "the upper bound is below the lower bound"));
        }
        if (h - l) as usize >= MAX_HOSTS || out.len() + (h - l) as usize >= MAX_HOSTS {
            return Err(HostlistError::TooLarge { list: list.into() });
        }
        let width = lo.len();
        for n in l..=h {
            out.push(format!("{n:0width$}"));
        }
    }
    Ok(out)
}

fn expand_item(list: &str, pieces: &[Piece], hosts: &mut Vec<String>) -> Result<(), HostlistError> {
    let mut names = vec![String::new()];
    for piece in pieces {
        match piece {
            Piece::Text(t) => names.iter_mut().for_each(|n| n.push_str(t)),
            Piece::Group(nums) => {
                if names.len().saturating_mul(nums.len()).saturating_add(hosts.len()) > MAX_HOSTS {
                    return Err(HostlistError::TooLarge { list: list.into() });
                }
                names = names
                    .iter()
                    .flat_map(|n| nums.iter().map(move |num| format!("{n}{num}")))
                    .collect();
            }
        }
    }
    if hosts.len() + names.len() > MAX_HOSTS {
        return Err(HostlistError::TooLarge { list: list.into() });
    }
    hosts.extend(names);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(s: &str) -> Vec<String> {
        expand(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn plain_names_and_lists() {
        assert_eq!(ex("node1"), ["node1"]);
        assert_eq!(ex("b,a,c"), ["b", "a", "c"]);
        assert_eq!(ex(" a , b "), ["a", "b"]);
        assert_eq!(ex("a,,b"), ["a", "b"]);
    }

    #[test]
    fn ranges_and_zero_padding() {
        assert_eq!(ex("n[1-3]"), ["n1", "n2", "n3"]);
        assert_eq!(ex("n[001-003]"), ["n001", "n002", "n003"]);
        assert_eq!(ex("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(ex("n[08-10]"), ["n08", "n09", "n10"]);
        assert_eq!(ex("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(ex("n[7]"), ["n7"]);
    }

    #[test]
    fn comma_lists_inside_brackets_keep_order() {
        assert_eq!(ex("n[5,1-2,9]"), ["n5", "n1", "n2", "n9"]);
        assert_eq!(ex("n[1,1]"), ["n1", "n1"]);
    }

    #[test]
    fn several_groups_expand_leftmost_slowest() {
        assert_eq!(ex("a[1-2]b[3,5]"), ["a1b3", "a1b5", "a2b3", "a2b5"]);
        assert_eq!(ex("r[1-2]-n[01-02]-x"), ["r1-n01-x", "r1-n02-x", "r2-n01-x", "r2-n02-x"]);
    }

    #[test]
    fn mixed_items() {
        assert_eq!(
            ex("login,gpu[01-02],cpu[1,3]x,z"),
            ["login", "gpu01", "gpu02", "cpu1x", "cpu3x", "z"]
        );
        assert_eq!(ex("[1-2]"), ["1", "2"]);
    }

    #[test]
    fn first_host_is_the_first_expanded() {
        assert_eq!(first_host("gpu[07-09],cpu1").unwrap(), "gpu07");
    }

    #[test]
    fn malformed_lists_are_refused_with_reasons() {
        assert_eq!(expand(""), Err(HostlistError::Empty));
        assert!(matches!(expand("n[1-3"), Err(HostlistError::Unclosed { pos: 1, .. })));
        assert!(matches!(expand("n1-3]"), Err(HostlistError::Unopened { pos: 4, .. })));
        assert!(matches!(expand("n[1[2]]"), Err(HostlistError::Nested { pos: 3, .. })));
        assert_eq!(expand(" , ,"), Err(HostlistError::Empty));
        for bad in ["n[]", "n[a-b]", "n[3-1]", "n[1-]", "n[1,,2]", "n[-2]", "n[1-2-3]"] {
            let e = expand(bad).expect_err(bad);
            assert!(matches!(e, HostlistError::BadRange { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(matches!(expand("n[0-99999999]"), Err(HostlistError::TooLarge { .. })));
        assert!(matches!(expand("a[0-999]b[0-999]c[0-999]"), Err(HostlistError::TooLarge { .. })));
        assert!(matches!(
            expand("n[99999999999999999999]"),
            Err(HostlistError::BadRange { why: "number too large", .. })
        ));
    }
}

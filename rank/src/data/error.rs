use std::path::PathBuf;

/// Everything that can go wrong reading, writing or checking data. Messages name the file (or
/// data set) and say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: not a Tessera shard (magic bytes {found:?}, expected \"TSRASHRD\"); \
         pass a file written by `tessera data synth` / `tessera data import`",
        path.display()
    )]
    BadMagic { path: PathBuf, found: String },

    #[error(
        "{}: shard format version {found}, this build reads version {supported}; \
         re-create the shard with this version of `tessera data`",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },

    #[error(
        "{}: truncated or padded: the header promises {expected} bytes, the file has {actual}; \
         the copy is incomplete or damaged, re-create or re-copy it",
        path.display()
    )]
    Length { path: PathBuf, expected: u64, actual: u64 },

    #[error(
        "{}: checksum mismatch (stored {stored:016x}, computed {computed:016x}): the file is \
         corrupt; re-create or re-copy it",
        path.display()
    )]
    Checksum { path: PathBuf, stored: u64, computed: u64 },

    #[error("{}: invalid shard: {reason}; re-create it with `tessera data`", path.display())]
    Invalid { path: PathBuf, reason: String },

    #[error("{}: {reason}", path.display())]
    Npy { path: PathBuf, reason: String },

    #[error("{0}")]
    Shape(String),

    #[error(
        "{dataset} has {found} {what}, but the config expects {expected}: set `{key} = {found}` \
         (or use a data set with {expected} {what})"
    )]
    DimMismatch { dataset: String, what: String, found: usize, expected: usize, key: String },

    #[error("{dataset} is a {found} data set, but this model needs a {expected} one")]
    KindMismatch { dataset: String, found: String, expected: String },

    #[error("data.synth: {0}")]
    Synth(String),

    #[error("sampler: {0}")]
    Sampler(String),
}

impl DataError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> DataError {
        DataError::Io { op, path: path.into(), source }
    }
}

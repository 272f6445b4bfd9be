//! Anti-rollback anchors: a monotonic counter outside the data directory that a copy of
//! the directory cannot take back with it.
//!
//! The store keeps the count it expects in its sealed state and, in every commit that
//! destroys a key (a patient purged, a lease ended, a record replaced, a restored copy
//! reset), writes the next count; after the commit the counter is advanced to it. At
//! open the two are compared: equal, or the store one ahead (a crash between a commit
//! and its advance, completed then), is the live store; the store behind the counter is
//! a copy taken before a later purge, and the store ahead of the counter by more, or a
//! counter gone, is a copy moved to another anchor. Either is destroyed before anything
//! is served (see `Store::bind_anchor` and docs/STORE.md "Anti-rollback").
//!
//! Two counters: a TPM 2.0 NV counter (feature `tpm`; hardware monotonic, survives a
//! restore of the whole disk) and a counter file outside the data directory (survives a
//! restore of the data directory alone). Without either, a restored copy is not
//! detected (docs/clinical-safety/hazard-log.md, HAZ-21).

use std::fmt;
use std::path::{Path, PathBuf};

use sync_protocol::message::AnchorKind;

/// What went wrong with an anchor. Never carries patient data.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// The counter could not be reached, read or advanced.
    #[error("anti-rollback anchor ({what}): {message}")]
    Unavailable {
        /// Which anchor.
        what: String,
        /// Why.
        message: String,
    },
    /// Something holds the counter's place but is not a counter this device can use.
    #[error("anti-rollback anchor ({what}) is not usable: {message}")]
    Unusable {
        /// Which anchor.
        what: String,
        /// Why, and the fix.
        message: String,
    },
}

/// A monotonic counter outside the data directory.
pub trait Counter: Send + Sync + fmt::Debug {
    /// The kind, as reported to the hub.
    fn kind(&self) -> AnchorKind;
    /// Which counter (an NV index and TPM, or a file path), for status and errors.
    fn describe(&self) -> String;
    /// The counter's value; `None` when it does not exist yet.
    fn read(&self) -> Result<Option<u64>, AnchorError>;
    /// Makes the counter if it does not exist, and returns its value.
    fn create(&self) -> Result<u64, AnchorError>;
    /// Advances the counter by one and returns its new value.
    fn advance(&self) -> Result<u64, AnchorError>;
}

/// A counter in a file outside the data directory: one line, `carecache-anchor 1 <n>`,
/// replaced whole (written, synced, renamed, directory synced) at each advance.
#[derive(Debug)]
pub struct FileCounter {
    path: PathBuf,
}

const FILE_MAGIC: &str = "carecache-anchor 1";

impl FileCounter {
    /// A counter at `path` (which must not lie inside the data directory).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    fn unavailable(&self, message: impl fmt::Display) -> AnchorError {
        AnchorError::Unavailable {
            what: self.describe(),
            message: message.to_string(),
        }
    }

    fn write(&self, n: u64) -> Result<(), AnchorError> {
        use std::io::Write;
        let dir = self
            .path
            .parent()
            .ok_or_else(|| self.unavailable("the path has no directory"))?;
        let tmp = self.path.with_extension("next");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| self.unavailable(e))?;
        f.write_all(format!("{FILE_MAGIC} {n}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| self.unavailable(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.unavailable(e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.unavailable(e))
    }
}

impl Counter for FileCounter {
    fn kind(&self) -> AnchorKind {
        AnchorKind::File
    }

    fn describe(&self) -> String {
        format!("counter file {}", self.path.display())
    }

    fn read(&self) -> Result<Option<u64>, AnchorError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.unavailable(e)),
        };
        text.strip_suffix('\n')
            .and_then(|l| l.strip_prefix(FILE_MAGIC))
            .and_then(|l| l.strip_prefix(' '))
            .and_then(|n| n.parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| AnchorError::Unusable {
                what: self.describe(),
                message: "the file is damaged; remove it and the device discards its data \
                          and syncs again from nothing"
                    .to_owned(),
            })
    }

    fn create(&self) -> Result<u64, AnchorError> {
        if let Some(n) = self.read()? {
            return Ok(n);
        }
        if let Some(dir) = self.path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| self.unavailable(e))?;
        }
        self.write(1)?;
        Ok(1)
    }

    fn advance(&self) -> Result<u64, AnchorError> {
        let n = self
            .read()?
            .ok_or_else(|| self.unavailable("the counter file is gone"))?;
        let next = n
            .checked_add(1)
            .ok_or_else(|| self.unavailable("the counter is at its end"))?;
        self.write(next)?;
        Ok(next)
    }
}

/// The NV index a device uses by default (in the owner's range).
pub const DEFAULT_NV_INDEX: u32 = 0x0100_CACE;

/// Where the TPM is by default: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// A TPM 2.0 NV counter (an index of type counter, owner authorisation), reached
/// through a TCTI (`device:/dev/tpmrm0`, or `swtpm:host=…,port=…` for a software TPM).
#[cfg(feature = "tpm")]
#[derive(Debug)]
pub struct TpmCounter {
    tcti: String,
    index: u32,
}

#[cfg(feature = "tpm")]
impl TpmCounter {
    /// A counter at NV `index` of the TPM reached through `tcti`.
    pub fn new(tcti: &str, index: u32) -> Self {
        Self {
            tcti: tcti.to_owned(),
            index,
        }
    }

    fn unavailable(&self, message: impl fmt::Display) -> AnchorError {
        AnchorError::Unavailable {
            what: format!("{} via {}", self.describe(), self.tcti),
            message: message.to_string(),
        }
    }

    fn context(&self) -> Result<tss_esapi::Context, AnchorError> {
        use std::str::FromStr;
        let conf = tss_esapi::tcti_ldr::TctiNameConf::from_str(&self.tcti)
            .map_err(|e| self.unavailable(format!("TCTI: {e}")))?;
        tss_esapi::Context::new(conf).map_err(|e| self.unavailable(e))
    }

    fn handle(&self) -> Result<tss_esapi::handles::NvIndexTpmHandle, AnchorError> {
        tss_esapi::handles::NvIndexTpmHandle::new(self.index).map_err(|_| AnchorError::Unusable {
            what: self.describe(),
            message: "not an NV index handle".to_owned(),
        })
    }

    /// Whether the index exists; refused if it exists but is not an 8-byte counter.
    fn exists(&self, ctx: &mut tss_esapi::Context) -> Result<bool, AnchorError> {
        use tss_esapi::constants::nv_index_type::NvIndexType;
        let wanted = self.handle()?;
        let all = tss_esapi::abstraction::nv::list(ctx).map_err(|e| self.unavailable(e))?;
        let Some((public, _)) = all.iter().find(|(p, _)| p.nv_index() == wanted) else {
            return Ok(false);
        };
        let attrs = public.attributes();
        let counter = matches!(attrs.index_type(), Ok(NvIndexType::Counter));
        if !counter || public.data_size() != 8 || !attrs.owner_read() || !attrs.owner_write() {
            return Err(AnchorError::Unusable {
                what: self.describe(),
                message: "the NV index holds something other than an owner counter; \
                          name a free index with [anchor] nv_index"
                    .to_owned(),
            });
        }
        Ok(true)
    }

    fn read_value(&self, ctx: &mut tss_esapi::Context) -> Result<u64, AnchorError> {
        use tss_esapi::interface_types::{resource_handles::NvAuth, session_handles::AuthSession};
        let object = ctx
            .tr_from_tpm_public(self.handle()?.into())
            .map_err(|e| self.unavailable(e))?;
        let bytes = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_read(NvAuth::Owner, object.into(), 8, 0)
            })
            .map_err(|e| self.unavailable(e))?;
        let raw: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| self.unavailable("the counter read back short"))?;
        Ok(u64::from_be_bytes(raw))
    }

    fn increment(&self, ctx: &mut tss_esapi::Context) -> Result<(), AnchorError> {
        use tss_esapi::interface_types::{resource_handles::NvAuth, session_handles::AuthSession};
        let object = ctx
            .tr_from_tpm_public(self.handle()?.into())
            .map_err(|e| self.unavailable(e))?;
        ctx.execute_with_session(Some(AuthSession::Password), |c| {
            c.nv_increment(NvAuth::Owner, object.into())
        })
        .map_err(|e| self.unavailable(e))
    }
}

#[cfg(feature = "tpm")]
impl Counter for TpmCounter {
    fn kind(&self) -> AnchorKind {
        AnchorKind::Tpm
    }

    /// The counter itself: how the TPM is reached (the TCTI) may change without
    /// making it another counter.
    fn describe(&self) -> String {
        format!("TPM NV counter {:#010x}", self.index)
    }

    fn read(&self) -> Result<Option<u64>, AnchorError> {
        let mut ctx = self.context()?;
        if !self.exists(&mut ctx)? {
            return Ok(None);
        }
        self.read_value(&mut ctx).map(Some)
    }

    fn create(&self) -> Result<u64, AnchorError> {
        use tss_esapi::attributes::NvIndexAttributesBuilder;
        use tss_esapi::constants::nv_index_type::NvIndexType;
        use tss_esapi::interface_types::{
            algorithm::HashingAlgorithm, resource_handles::Provision, session_handles::AuthSession,
        };
        use tss_esapi::structures::NvPublicBuilder;
        let mut ctx = self.context()?;
        if self.exists(&mut ctx)? {
            return self.read_value(&mut ctx);
        }
        let attributes = NvIndexAttributesBuilder::new()
            .with_owner_write(true)
            .with_owner_read(true)
            .with_nv_index_type(NvIndexType::Counter)
            .build()
            .map_err(|e| self.unavailable(e))?;
        let public = NvPublicBuilder::new()
            .with_nv_index(self.handle()?)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attributes)
            .with_data_area_size(8)
            .build()
            .map_err(|e| self.unavailable(e))?;
        ctx.execute_with_session(Some(AuthSession::Password), |c| {
            c.nv_define_space(Provision::Owner, None, public)
        })
        .map_err(|e| self.unavailable(e))?;
        // A counter reads only once incremented; it starts above every counter this TPM
        // has had, so a counter defined again never repeats an old value.
        self.increment(&mut ctx)?;
        self.read_value(&mut ctx)
    }

    fn advance(&self) -> Result<u64, AnchorError> {
        let mut ctx = self.context()?;
        self.increment(&mut ctx)?;
        self.read_value(&mut ctx)
    }
}

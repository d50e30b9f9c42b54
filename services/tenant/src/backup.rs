//! Per-tenant backups (TM6, BX7): `hafen-tenant backup`.
//!
//! One backup is one tenant's schema, dumped by PostgreSQL's own `pg_dump -n` (custom format,
//! no owner, no privileges, as the tenant's role), with its control-plane row (never a key),
//! encrypted as it streams and written with a manifest:
//!
//! - `<out>/<tenant id>/<time>.hafenbak`: `HAFENBK1`, the backup's random id (16 bytes), then
//!   records of a 4-byte big-endian length and an AES-256-GCM box. Record 0 is the
//!   control-plane row as JSON, the others the dump in pieces of [`PIECE`] bytes. Each box's
//!   associated data is the tenant id, the backup id, the record's number and whether it is
//!   the last, so records cannot be moved, dropped or cut off unnoticed.
//! - `<out>/<tenant id>/<time>.manifest.json`: tenant, slug, time, the schema's newest
//!   migration, the dump's and the file's sizes, and the file's SHA-256.
//!
//! The key is derived from the master key for backups alone; the backup holds no key at all:
//! the tenant's and its users' keys stay in the key store ([`hafen_store::keystore`]), so a
//! user erased after the backup stays unreadable in it. Memory does not grow with the tenant:
//! the dump is read, sealed and written a piece at a time, and a restore opens it and feeds
//! `pg_restore` a piece at a time ([`Reader`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;
use hafen_crypto::{DataKey, MasterKey};
use hafen_store::{Databases, DatabasesArgs, TenantId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::Error;

/// Bytes of the dump per sealed record.
pub const PIECE: usize = 1024 * 1024;
/// The file's first bytes.
const MAGIC: &[u8; 8] = b"HAFENBK1";
/// The shortest retention `--keep` accepts: six weeks.
pub const MIN_KEEP: Duration = Duration::from_secs(42 * 24 * 3600);
/// The label the backup key is derived from the master key under.
const KEY_LABEL: &str = "hafen tenant backups v1";

/// `hafen-tenant backup`.
#[derive(clap::Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub databases: DatabasesArgs,

    /// The master key file (the backup key is derived from it).
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE")]
    pub master_key_file: PathBuf,

    /// The tenant to back up: its id or slug.
    #[arg(
        long,
        env = "HAFEN_BACKUP_TENANT",
        conflicts_with = "all",
        required_unless_present = "all"
    )]
    pub tenant: Option<String>,

    /// Back up every active tenant, then delete backups older than --keep.
    #[arg(long, env = "HAFEN_BACKUP_ALL")]
    pub all: bool,

    /// The directory backups go to, one sub-directory per tenant.
    #[arg(long, env = "HAFEN_BACKUP_DIR")]
    pub out: PathBuf,

    /// How long backups are kept by --all, at least 42 days (six weeks).
    #[arg(long, env = "HAFEN_BACKUP_KEEP", default_value = "42days", value_parser = keep)]
    pub keep: Duration,

    /// Tenants backed up at the same time by --all.
    #[arg(long, env = "HAFEN_BACKUP_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,

    /// The pg_dump program (of the PostgreSQL version of the databases, or newer).
    #[arg(long, env = "HAFEN_PG_DUMP", default_value = "pg_dump")]
    pub pg_dump: PathBuf,

    #[command(flatten)]
    pub telemetry: hafen_platform::TelemetryArgs,
}

fn keep(value: &str) -> Result<Duration, String> {
    let keep = humantime::parse_duration(value).map_err(|err| err.to_string())?;
    if keep < MIN_KEEP {
        return Err("at least 42days: backups are kept six weeks or longer".into());
    }
    Ok(keep)
}

/// A backup's manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub backup_id: Uuid,
    pub tenant_id: Uuid,
    pub slug: String,
    pub created_at: DateTime<Utc>,
    /// The newest migration applied to the tenant's schema when it was dumped.
    pub schema_version: String,
    pub dump_bytes: u64,
    pub file_bytes: u64,
    /// SHA-256 of the backup file, hex.
    pub sha256: String,
    /// The backup file's name, next to the manifest.
    pub file: String,
}

/// What a backup holds, once opened.
pub struct Opened {
    /// The tenant's control-plane row, as JSON.
    pub control: serde_json::Value,
    /// The `pg_dump` archive (custom format).
    pub dump: Vec<u8>,
}

/// The key backups are sealed with.
pub fn backup_key(master: &MasterKey) -> DataKey {
    DataKey::from_bytes(*master.derive(KEY_LABEL))
}

fn associated(tenant: Uuid, backup: Uuid, record: u64, last: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(41);
    out.extend_from_slice(tenant.as_bytes());
    out.extend_from_slice(backup.as_bytes());
    out.extend_from_slice(&record.to_be_bytes());
    out.push(u8::from(last));
    out
}

/// Backs up tenant `wanted` (id or slug) into `out`; returns its manifest.
pub async fn backup_one(
    databases: &Databases,
    key: &DataKey,
    pg_dump: &Path,
    wanted: &str,
    out: &Path,
) -> Result<Manifest, Error> {
    let row = {
        let mut conn = databases.main_connection().await?;
        let found = match Uuid::try_parse(wanted) {
            Ok(id) => hafen_store::control::find(&mut conn, id).await?,
            Err(_) => hafen_store::control::find_by_slug(&mut conn, wanted).await?,
        };
        found
            .filter(|row| row.status == hafen_store::control::status::ACTIVE)
            .ok_or(Error::NotFound)?
    };
    let tenant = TenantId::from(row.id);
    let schema = tenant.schema();
    let url = databases
        .url(&row.database_name)
        .ok_or_else(|| Error::Config(format!("unknown database {}", row.database_name)))?
        .to_owned();
    #[derive(diesel::QueryableByName)]
    struct Version {
        #[diesel(sql_type = Text)]
        version: String,
    }
    let pool = databases.tenant_pool(&tenant).await?;
    let version: Version = hafen_store::with_tenant(&pool, &tenant, |conn| {
        Box::pin(async move {
            Ok::<_, Error>(
                diesel::sql_query(
                    "SELECT coalesce(max(version), '') AS version FROM __diesel_schema_migrations",
                )
                .get_result(conn)
                .await?,
            )
        })
    })
    .await?;

    let created_at = hafen_store::now();
    let backup_id = Uuid::new_v4();
    let dir = out.join(row.id.to_string());
    let stamp = created_at.format("%Y%m%dT%H%M%S%.6fZ").to_string();
    let name = format!("{stamp}.hafenbak");
    let control = serde_json::json!({
        "tenant_id": row.id,
        "slug": row.slug,
        "display_name": row.display_name,
        "region": row.region,
        "dpa_version": row.dpa_version,
        "dpa_accepted_at": row.dpa_accepted_at,
        "dpa_accepted_by": row.dpa_accepted_by,
        "database_name": row.database_name,
        "settings": row.settings,
        "created_at": row.created_at,
    });
    let job = Dump {
        pg_dump: pg_dump.to_owned(),
        url,
        schema,
        tenant: row.id,
        backup_id,
        control: serde_json::to_vec(&control).unwrap_or_default(),
        key: DataKey::from_bytes(*key.expose()),
        dir: dir.clone(),
        name: name.clone(),
    };
    let (dump_bytes, file_bytes, sha256) = tokio::task::spawn_blocking(move || job.run()).await??;

    let manifest = Manifest {
        format: "hafen-backup-1".into(),
        backup_id,
        tenant_id: row.id,
        slug: row.slug.clone().unwrap_or_default(),
        created_at,
        schema_version: version.version,
        dump_bytes,
        file_bytes,
        sha256,
        file: name,
    };
    let manifest_path = dir.join(format!("{stamp}.manifest.json"));
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    )
    .map_err(|err| Error::Config(format!("{}: {err}", manifest_path.display())))?;
    tracing::info!(tenant_id = %row.id, bytes = file_bytes, "tenant backed up");
    Ok(manifest)
}

/// The dump of one tenant's schema, sealed into its backup file, on a blocking thread.
struct Dump {
    pg_dump: PathBuf,
    url: String,
    schema: String,
    tenant: Uuid,
    backup_id: Uuid,
    control: Vec<u8>,
    key: DataKey,
    dir: PathBuf,
    name: String,
}

impl Dump {
    /// Runs pg_dump and writes the sealed file (under a temporary name until complete);
    /// returns the dump's size, the file's size and its SHA-256 (hex).
    fn run(self) -> Result<(u64, u64, String), Error> {
        use std::io::{Read, Write};
        let io = |err: std::io::Error| Error::Config(format!("backup of {}: {err}", self.tenant));
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let path = self.dir.join(&self.name);
        let partial = self.dir.join(format!("{}.partial", self.name));
        let mut child = std::process::Command::new(&self.pg_dump)
            .arg("--format=custom")
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg(format!("--schema={}", self.schema))
            .arg(format!("--role={}", self.schema))
            .arg(format!("--dbname={}", self.url))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|err| Error::Config(format!("{}: {err}", self.pg_dump.display())))?;
        let mut dump = child
            .stdout
            .take()
            .ok_or_else(|| Error::Config("no pg_dump output".into()))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| Error::Config("no pg_dump errors".into()))?;
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let written = (|| -> Result<(u64, u64, String), Error> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
            let mut hasher = Sha256::new();
            let mut file_bytes = 0_u64;
            let mut put = |bytes: &[u8], file: &mut std::io::BufWriter<std::fs::File>| {
                hasher.update(bytes);
                file_bytes += bytes.len() as u64;
                file.write_all(bytes).map_err(io)
            };
            put(MAGIC, &mut file)?;
            put(self.backup_id.as_bytes(), &mut file)?;
            let mut record = 0_u64;
            let mut seal =
                |plain: &[u8], last: bool, file: &mut std::io::BufWriter<std::fs::File>| {
                    let sealed = self.key.seal(
                        &associated(self.tenant, self.backup_id, record, last),
                        plain,
                    )?;
                    record += 1;
                    put(
                        &u32::try_from(sealed.len())
                            .unwrap_or(u32::MAX)
                            .to_be_bytes(),
                        file,
                    )?;
                    put(&sealed, file)
                };
            seal(&self.control, false, &mut file)?;
            // The dump, a piece at a time; a piece is sealed once the next one shows whether
            // it is the last.
            let mut dump_bytes = 0_u64;
            let mut current = read_piece(&mut dump).map_err(io)?;
            loop {
                let next = if current.is_empty() {
                    Vec::new()
                } else {
                    read_piece(&mut dump).map_err(io)?
                };
                let last = next.is_empty();
                dump_bytes += current.len() as u64;
                seal(&current, last, &mut file)?;
                if last {
                    break;
                }
                current = next;
            }
            let file = file.into_inner().map_err(|err| io(err.into_error()))?;
            file.sync_all().map_err(io)?;
            Ok((dump_bytes, file_bytes, hex::encode(hasher.finalize())))
        })();
        if written.is_err() {
            // pg_dump would wait forever on a pipe nobody reads any more.
            let _ = child.kill();
        }
        let status = child.wait().map_err(io)?;
        let errors = errors.join().unwrap_or_default();
        let written = match written {
            Ok(written) if status.success() => written,
            Ok(_) => {
                let _ = std::fs::remove_file(&partial);
                return Err(Error::Config(format!(
                    "pg_dump of {} failed: {}",
                    self.tenant,
                    errors.lines().next().unwrap_or_default()
                )));
            }
            Err(err) => {
                let _ = std::fs::remove_file(&partial);
                return Err(err);
            }
        };
        std::fs::rename(&partial, &path).map_err(io)?;
        Ok(written)
    }
}

/// Up to [`PIECE`] bytes of `from`; empty at its end.
fn read_piece(from: &mut impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut piece = vec![0; PIECE];
    let mut filled = 0;
    while filled < PIECE {
        let read = from.read(&mut piece[filled..])?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    piece.truncate(filled);
    Ok(piece)
}

/// Checks the backup of `manifest` (in `dir`) against its checksum and opens it with `key`,
/// whole, in memory ([`Reader`] reads one a piece at a time). A changed byte, a missing or
/// moved record, or another key: an error, never a wrong dump.
pub fn open(dir: &Path, manifest: &Manifest, key: &DataKey) -> Result<Opened, Error> {
    let (control, mut reader) = Reader::open(dir, manifest, key)?;
    let mut dump = Vec::new();
    while let Some(piece) = reader.next_piece()? {
        dump.extend_from_slice(&piece);
    }
    Ok(Opened { control, dump })
}

/// A backup file read a record at a time, so memory does not grow with the tenant: the file's
/// SHA-256 is checked against the manifest in a first pass, then each record is opened as it
/// is read. A record that does not open, or a file that ends before its last record, is an
/// error at that record.
pub struct Reader {
    file: std::io::BufReader<std::fs::File>,
    key: DataKey,
    tenant: Uuid,
    backup: Uuid,
    record: u64,
    done: bool,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("backup", &self.backup)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// The largest sealed record a backup holds: a piece, its nonce, tag and format byte.
const MAX_RECORD: usize = PIECE + 64;

impl Reader {
    /// Checks the file against `manifest` and reads its first record, the tenant's
    /// control-plane row; the dump follows from [`Reader::next_piece`].
    pub fn open(
        dir: &Path,
        manifest: &Manifest,
        key: &DataKey,
    ) -> Result<(serde_json::Value, Self), Error> {
        use std::io::{Read as _, Seek as _};
        let bad = |why: &str| Error::Config(format!("backup {}: {why}", manifest.backup_id));
        let mut file =
            std::fs::File::open(dir.join(&manifest.file)).map_err(|err| bad(&err.to_string()))?;
        let mut hash = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(|err| bad(&err.to_string()))?;
            if n == 0 {
                break;
            }
            hash.update(&buffer[..n]);
        }
        if hex::encode(hash.finalize()) != manifest.sha256 {
            return Err(bad("its checksum does not match the manifest"));
        }
        file.rewind().map_err(|err| bad(&err.to_string()))?;
        let mut file = std::io::BufReader::with_capacity(256 * 1024, file);
        let mut head = [0u8; 24];
        file.read_exact(&mut head)
            .map_err(|_| bad("not a Hafen backup"))?;
        if &head[..8] != MAGIC.as_slice() {
            return Err(bad("not a Hafen backup"));
        }
        if &head[8..] != manifest.backup_id.as_bytes().as_slice() {
            return Err(bad("another backup's file"));
        }
        let mut reader = Self {
            file,
            key: DataKey::from_bytes(*key.expose()),
            tenant: manifest.tenant_id,
            backup: manifest.backup_id,
            record: 0,
            done: false,
        };
        let control = reader.next_record()?.ok_or_else(|| bad("empty"))?;
        let control =
            serde_json::from_slice(&control).map_err(|_| bad("its control-plane part"))?;
        if reader.done {
            return Err(bad("empty"));
        }
        Ok((control, reader))
    }

    /// The next piece of the `pg_dump` archive, `None` after the last.
    pub fn next_piece(&mut self) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, Error> {
        self.next_record()
    }

    fn next_record(&mut self) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, Error> {
        use std::io::{BufRead as _, Read as _};
        let bad = |why: &str| Error::Config(format!("backup {}: {why}", self.backup));
        if self.done {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len).map_err(|_| bad("cut off"))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RECORD {
            return Err(bad("cut off"));
        }
        let mut sealed = vec![0u8; len];
        self.file
            .read_exact(&mut sealed)
            .map_err(|_| bad("cut off"))?;
        let at_end = self
            .file
            .fill_buf()
            .map_err(|err| bad(&err.to_string()))?
            .is_empty();
        // Record 0, the control-plane row, is never the last: a dump follows it.
        let last = at_end && self.record > 0;
        let plain = self
            .key
            .open(
                &associated(self.tenant, self.backup, self.record, last),
                &sealed,
            )
            .map_err(|_| bad("does not open with this key, or was changed"))?;
        self.record += 1;
        self.done = at_end;
        Ok(Some(plain))
    }
}

/// The manifests of the backups of `tenant` in `out`, oldest first.
pub fn manifests(out: &Path, tenant: Uuid) -> Result<Vec<Manifest>, Error> {
    let dir = out.join(tenant.to_string());
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(err) => return Err(Error::Config(format!("{}: {err}", dir.display()))),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with(".manifest.json")
            && let Ok(bytes) = std::fs::read(&path)
            && let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes)
        {
            found.push(manifest);
        }
    }
    found.sort_by_key(|m| m.created_at);
    Ok(found)
}

/// Deletes the backups in `out` (of every tenant directory) made before `before`: file and
/// manifest. Returns how many.
pub fn prune(out: &Path, before: DateTime<Utc>) -> Result<usize, Error> {
    let mut pruned = 0;
    let entries = match std::fs::read_dir(out) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(Error::Config(format!("{}: {err}", out.display()))),
    };
    for entry in entries.flatten() {
        let Some(tenant) = entry
            .file_name()
            .to_str()
            .and_then(|name| Uuid::try_parse(name).ok())
        else {
            continue;
        };
        let dir = entry.path();
        for manifest in manifests(out, tenant)? {
            if manifest.created_at >= before {
                continue;
            }
            let stem = manifest.file.trim_end_matches(".hafenbak");
            std::fs::remove_file(dir.join(&manifest.file))
                .or_else(|err| {
                    if err.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(err)
                    }
                })
                .map_err(|err| Error::Config(format!("{}: {err}", dir.display())))?;
            std::fs::remove_file(dir.join(format!("{stem}.manifest.json")))
                .map_err(|err| Error::Config(format!("{}: {err}", dir.display())))?;
            pruned += 1;
        }
    }
    Ok(pruned)
}

/// What `backup --all` did.
#[derive(Debug, Default)]
pub struct Report {
    pub backed_up: Vec<Manifest>,
    /// Tenants whose backup failed, with why.
    pub failed: Vec<(Uuid, String)>,
    pub pruned: usize,
}

/// `hafen-tenant backup`: one tenant, or every active tenant (`concurrency` at a time, a
/// progress bar on a terminal) and then the pruning of what is older than `keep`.
pub async fn run(args: &BackupArgs) -> Result<Report, Error> {
    use futures::StreamExt as _;
    let databases = Databases::new(&args.databases)?;
    let master = MasterKey::load(&args.master_key_file)?;
    let key = backup_key(&master);
    let mut report = Report::default();
    if let Some(tenant) = &args.tenant {
        report
            .backed_up
            .push(backup_one(&databases, &key, &args.pg_dump, tenant, &args.out).await?);
        return Ok(report);
    }
    let tenants: Vec<Uuid> = {
        let mut conn = databases.main_connection().await?;
        hafen_store::control::active_placements(&mut conn)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        indicatif::ProgressBar::new(tenants.len() as u64).with_message("backing up tenants")
    });
    let mut done = futures::stream::iter(tenants.into_iter().map(|tenant| {
        let (databases, key) = (&databases, &key);
        async move {
            let result = backup_one(
                databases,
                key,
                &args.pg_dump,
                &tenant.to_string(),
                &args.out,
            )
            .await;
            (tenant, result)
        }
    }))
    .buffer_unordered(args.concurrency.max(1));
    while let Some((tenant, result)) = done.next().await {
        if let Some(bar) = &bar {
            bar.inc(1);
        }
        match result {
            Ok(manifest) => report.backed_up.push(manifest),
            // Deleted since it was listed: nothing to back up.
            Err(Error::NotFound) => {}
            Err(err) => {
                tracing::error!(tenant_id = %tenant, error = %err, "backup failed");
                report.failed.push((tenant, err.to_string()));
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let keep = chrono::TimeDelta::from_std(args.keep).unwrap_or(chrono::TimeDelta::MAX);
    report.pruned = prune(&args.out, hafen_store::now() - keep)?;
    // The Art. 30 record states backups while complete runs are recent.
    let mut conn = databases.main_connection().await?;
    hafen_store::facts::record_backup_run(
        &mut conn,
        &hafen_store::facts::BackupRun {
            finished_at: hafen_store::now(),
            tenants: i32::try_from(report.backed_up.len()).unwrap_or(i32::MAX),
            failed: i32::try_from(report.failed.len()).unwrap_or(i32::MAX),
            keep_days: i32::try_from(keep.num_days()).unwrap_or(i32::MAX),
        },
    )
    .await?;
    Ok(report)
}

/// `hafen-tenant restore`.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub databases: DatabasesArgs,

    #[command(flatten)]
    pub redis: hafen_authn::RedisArgs,

    /// The master key file (the backup key is derived from it).
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE")]
    pub master_key_file: PathBuf,

    /// The backup's manifest (`<out>/<tenant id>/<time>.manifest.json`); its backup file lies
    /// next to it.
    pub manifest: PathBuf,

    /// The database to restore into, by its configured name (`default` or a placement);
    /// default: where the control plane places the tenant. Another one moves a live tenant
    /// there: the control plane places it there, running services are told over Redis (or
    /// find out within 30 s), and its schema on the old database is dropped.
    #[arg(long = "to-database", env = "HAFEN_RESTORE_DATABASE")]
    pub database: Option<String>,

    /// Replace a live tenant's data with the backup's, in place or by moving it with
    /// --to-database (otherwise refused).
    #[arg(long, env = "HAFEN_RESTORE_REPLACE")]
    pub replace: bool,

    /// The pg_restore program (of the PostgreSQL version of the databases, or newer).
    #[arg(long, env = "HAFEN_PG_RESTORE", default_value = "pg_restore")]
    pub pg_restore: PathBuf,

    #[command(flatten)]
    pub telemetry: hafen_platform::TelemetryArgs,
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// The migrations applied after the restore (the backup's schema was older).
    pub migrated: Vec<String>,
    /// The deletion-log replay that ended it.
    pub replay: hafen_retention::ReplayReport,
    /// The databases a schema of the tenant was dropped from, as it lives elsewhere now.
    pub left: Vec<String>,
}

/// `hafen-tenant restore`: checks and opens the backup, recreates the tenant's role on the
/// target database and drops an old schema (refusing to replace a live tenant's unless
/// `replace`), restores the dump with pg_restore as the tenant's role (which creates the
/// schema, so the role owns it), migrates the schema to this version. A live tenant restored
/// onto another database moves there: the control plane places it there, the services are
/// told, and its schema elsewhere is dropped. The restore ends with the
/// deletion-log replay, which deletes or erases again whatever the backup brought back of a
/// deleted tenant or an erased user. The replay is not optional.
pub async fn restore(args: &RestoreArgs) -> Result<Restored, Error> {
    let bytes = std::fs::read(&args.manifest)
        .map_err(|err| Error::Config(format!("{}: {err}", args.manifest.display())))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|_| {
        Error::Config(format!(
            "{}: not a backup manifest",
            args.manifest.display()
        ))
    })?;
    let dir = args
        .manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let key = backup_key(&MasterKey::load(&args.master_key_file)?);
    let (control, reader) = Reader::open(&dir, &manifest, &key)?;
    let databases = Databases::new(&args.databases)?;
    let redis = hafen_authn::Redis::connect(&args.redis)
        .await
        .map_err(Error::Config)?;
    let row = {
        let mut conn = databases.main_connection().await?;
        match hafen_store::control::find(&mut conn, manifest.tenant_id).await? {
            Some(row) => row,
            None => recreate_row(&databases, &manifest, &control).await?,
        }
    };
    let live = row.status == hafen_store::control::status::ACTIVE;
    let target = args
        .database
        .clone()
        .unwrap_or_else(|| row.database_name.clone());
    // Moving a live tenant replaces what it has now just as restoring in place does.
    if live && target != row.database_name && !args.replace {
        return Err(Error::Config(format!(
            "tenant {} is live on {}: give --replace to replace it with the backup on {target}",
            manifest.tenant_id, row.database_name
        )));
    }
    let url = databases
        .url(&target)
        .ok_or_else(|| Error::Config(format!("unknown database {target}")))?
        .to_owned();
    let job = Load {
        pg_restore: args.pg_restore.clone(),
        url,
        tenant: TenantId::from(manifest.tenant_id),
        dump: reader,
        replace: args.replace,
        live,
    };
    let migrated = tokio::task::spawn_blocking(move || job.run()).await??;
    // The replay runs even when a database the tenant left could not be cleaned up.
    let moved = if live {
        move_tenant(&databases, &redis, &row, &target).await
    } else {
        Ok(Vec::new())
    };
    let replay = hafen_retention::Replayer::new(databases, Some(redis), None)
        .replay(false, hafen_events::Actor::Operator)
        .await
        .map_err(|err| {
            Error::Config(format!(
                "the deletion-log replay failed; run `hafen-retention replay-deletions`: {err}"
            ))
        })?;
    let left = moved?;
    tracing::info!(tenant_id = %manifest.tenant_id, "tenant restored");
    Ok(Restored {
        manifest,
        migrated,
        replay,
        left,
    })
}

/// Makes the live tenant of `row`, just restored onto `target`, live there alone: the control
/// plane places it on `target`, every service is told to forget where it was (and, should
/// the announcement not go out, the restore waits until their caches have expired), and then
/// its schema is dropped from every other database: the one it moved from, and any an earlier
/// move that failed half-way left behind. The tenant's role stays where the cluster is the
/// same. Returns the databases a schema was dropped from.
async fn move_tenant(
    databases: &Databases,
    redis: &hafen_authn::Redis,
    row: &hafen_store::control::TenantRow,
    target: &str,
) -> Result<Vec<String>, Error> {
    let tenant = TenantId::from(row.id);
    if target != row.database_name {
        let mut conn = databases.main_connection().await?;
        diesel::sql_query("UPDATE hafen.tenants SET database_name = $2 WHERE id = $1")
            .bind::<diesel::sql_types::Uuid, _>(row.id)
            .bind::<Text, _>(target)
            .execute(&mut conn)
            .await?;
        if !redis.announce_tenant_moved(row.id).await {
            tracing::warn!(
                tenant_id = %row.id,
                "the move was not announced; waiting for the services' placement caches to expire"
            );
            tokio::time::sleep(hafen_store::PLACEMENT_RECHECK).await;
        }
        tracing::info!(tenant_id = %row.id, database = target, "tenant moved");
    }
    let others: Vec<(String, String)> = databases
        .names()
        .into_iter()
        .filter(|name| name != target)
        .filter_map(|name| databases.url(&name).map(|url| (name, url.to_owned())))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut left = Vec::new();
        for (name, url) in others {
            let mut conn = hafen_store::connect::establish_sync(&url).map_err(|err| {
                Error::Config(format!(
                    "database {name}: {err}; the tenant's schema there is left behind: \
                     restore again once it is reachable"
                ))
            })?;
            if diesel::Connection::transaction(&mut conn, |conn| {
                let found = schema_exists(conn, &tenant)?;
                if found {
                    hafen_store::tenancy::drop_schema(conn, &tenant)?;
                }
                Ok::<_, Error>(found)
            })? {
                tracing::info!(tenant_id = %tenant.as_uuid(), database = %name, "schema left behind dropped");
                left.push(name);
            }
        }
        Ok(left)
    })
    .await?
}

/// Whether `tenant`'s schema exists in the database of `conn`.
fn schema_exists(
    conn: &mut hafen_store::tenancy::SyncConnection,
    tenant: &TenantId,
) -> Result<bool, Error> {
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    let found: Found = diesel::RunQueryDsl::get_result(
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS found")
            .bind::<Text, _>(tenant.schema()),
        conn,
    )?;
    Ok(found.found)
}

/// A control plane that lost the tenant's row (restored from an older copy, say) gets it back
/// from the backup, as an active tenant, when the key store still has the tenant: its key, or
/// its deletion in the log (then the replay that ends the restore deletes it again). Without
/// either the data could not be read, and nothing is restored.
async fn recreate_row(
    databases: &Databases,
    manifest: &Manifest,
    control: &serde_json::Value,
) -> Result<hafen_store::control::TenantRow, Error> {
    use diesel::{ExpressionMethods as _, QueryDsl as _};
    use hafen_store::schema::deletion_log;
    let id = manifest.tenant_id;
    {
        let mut keys = databases.keystore_connection().await?;
        let key = hafen_store::keystore::tenant_key(&mut keys, id)
            .await?
            .is_some();
        let deleted: bool = diesel::select(diesel::dsl::exists(
            deletion_log::table
                .filter(deletion_log::kind.eq("tenant"))
                .filter(deletion_log::tenant_id.eq(id)),
        ))
        .get_result(&mut keys)
        .await?;
        if !key && !deleted {
            return Err(Error::Config(format!(
                "the key store has no key of tenant {id}: restore the key store first"
            )));
        }
    }
    let mut row = control.clone();
    if let Some(fields) = row.as_object_mut() {
        fields.insert("id".into(), serde_json::json!(id));
        fields.insert("status".into(), serde_json::json!("active"));
        fields.insert("updated_at".into(), serde_json::json!(hafen_store::now()));
    }
    let mut conn = databases.main_connection().await?;
    diesel::sql_query(
        "INSERT INTO hafen.tenants (id, slug, display_name, status, region, dpa_version, \
         dpa_accepted_at, dpa_accepted_by, database_name, settings, created_at, updated_at) \
         SELECT id, slug, display_name, status, region, dpa_version, dpa_accepted_at, \
         dpa_accepted_by, database_name, coalesce(settings, '{}'), created_at, updated_at \
         FROM json_populate_record(NULL::hafen.tenants, $1::json)",
    )
    .bind::<Text, _>(row.to_string())
    .execute(&mut conn)
    .await
    .map_err(|err| {
        if hafen_store::is_unique_violation(&err, "tenants_slug_key") {
            Error::Config(format!(
                "tenant {id}'s slug is another organisation's now: not restored"
            ))
        } else {
            Error::from(err)
        }
    })?;
    tracing::warn!(tenant_id = %id, "control-plane row recreated from the backup");
    hafen_store::control::find(&mut conn, id)
        .await?
        .ok_or(Error::NotFound)
}

/// Loading a dump into a tenant's schema, on a blocking thread.
struct Load {
    pg_restore: PathBuf,
    url: String,
    tenant: TenantId,
    dump: Reader,
    replace: bool,
    live: bool,
}

impl Load {
    fn run(mut self) -> Result<Vec<String>, Error> {
        use diesel::connection::SimpleConnection as _;
        #[derive(diesel::QueryableByName)]
        struct Found {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            schema: bool,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            role: bool,
        }
        let name = self.tenant.schema();
        let mut conn =
            hafen_store::connect::establish_sync(&self.url).map_err(hafen_store::Error::from)?;
        let found: Found = diesel::RunQueryDsl::get_result(
            diesel::sql_query(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS schema, \
                        EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS role",
            )
            .bind::<Text, _>(&name),
            &mut conn,
        )?;
        if found.schema {
            if self.live && !self.replace {
                return Err(Error::Config(format!(
                    "tenant {} is live with its schema: give --replace to replace it",
                    self.tenant.as_uuid()
                )));
            }
            diesel::Connection::transaction(&mut conn, |conn| {
                hafen_store::tenancy::drop_schema(conn, &self.tenant)
            })?;
        }
        // A role left without its schema is used again; dropping the schema dropped its role.
        // pg_restore creates the schema as the role (it owns it then), which may create one
        // in this database only for as long as the restore runs.
        #[derive(diesel::QueryableByName)]
        struct Database {
            #[diesel(sql_type = Text)]
            name: String,
        }
        let database: Database = diesel::RunQueryDsl::get_result(
            diesel::sql_query("SELECT current_database()::text AS name"),
            &mut conn,
        )?;
        let database = database.name.replace('"', "\"\"");
        let role = if found.role && !found.schema {
            String::new()
        } else {
            format!("CREATE ROLE {name} NOLOGIN;")
        };
        conn.batch_execute(&format!(
            "{role} GRANT {name} TO CURRENT_USER; GRANT CREATE ON DATABASE \"{database}\" TO {name};"
        ))?;
        hafen_store::outbox::ensure(&mut conn)?;
        conn.batch_execute(&format!(
            "GRANT {} TO {name}",
            hafen_store::outbox::WRITER_ROLE
        ))?;
        let restored = self.pg_restore(&name);
        conn.batch_execute(&format!(
            "REVOKE CREATE ON DATABASE \"{database}\" FROM {name}"
        ))?;
        restored?;
        Ok(hafen_store::tenancy::migrate_schema(
            &mut conn,
            &self.tenant,
        )?)
    }

    /// pg_restore of the dump, given on its standard input a piece at a time as it is opened,
    /// as the tenant's role `name`, in one transaction that any error rolls back (a piece that
    /// does not open kills pg_restore before it can commit).
    fn pg_restore(&mut self, name: &str) -> Result<(), Error> {
        use std::io::Write as _;
        let program =
            |err: std::io::Error| Error::Config(format!("{}: {err}", self.pg_restore.display()));
        let mut child = std::process::Command::new(&self.pg_restore)
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg("--single-transaction")
            .arg("--exit-on-error")
            .arg(format!("--role={name}"))
            .arg(format!("--dbname={}", self.url))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(program)?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| Error::Config("no pg_restore input".into()))?;
        // A pg_restore that stops early closes its input: what it says is the error.
        let mut fed = Ok(());
        loop {
            match self.dump.next_piece() {
                Ok(Some(piece)) => {
                    if let Err(err) = stdin.write_all(&piece) {
                        fed = Err(Error::Config(err.to_string()));
                        break;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(err);
                }
            }
        }
        drop(stdin);
        let output = child.wait_with_output().map_err(program)?;
        if !output.status.success() || fed.is_err() {
            let errors = String::from_utf8_lossy(&output.stderr);
            return Err(Error::Config(format!(
                "pg_restore of {} failed: {}",
                self.tenant.as_uuid(),
                errors.lines().next().unwrap_or("its input was refused")
            )));
        }
        Ok(())
    }
}

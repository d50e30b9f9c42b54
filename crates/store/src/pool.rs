//! The connection pool.

use diesel_async::AsyncPgConnection;
use diesel_async::SimpleAsyncConnection;
use diesel_async::pooled_connection::deadpool::{Hook, HookError, Object};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use futures::FutureExt;

use crate::config::DatabaseArgs;
use crate::connect::Target;
use crate::error::{Error, Result};

/// A pool of PostgreSQL connections.
pub type Pool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;

/// A connection checked out of a [`Pool`]; returned to it on drop.
pub type PooledConnection = Object<AsyncPgConnection>;

/// What a returned connection is reset with before anyone else gets it. A transaction-local
/// role ends at commit anyway; this also undoes every session-level setting (the scope a
/// committer keeps, see [`crate::tenancy::enter_session`], or a `SET` that slipped through),
/// so the next user starts unscoped and a query that forgets its tenant fails loudly.
/// (`RESET ALL` leaves the role alone, hence `RESET ROLE`; never `DISCARD ALL`: it drops the
/// prepared statements diesel has cached.)
const RESET_ON_RETURN: &str = "RESET ALL; RESET ROLE";

/// Builds a pool for `args`, connecting over TLS as its URL says ([`crate::connect`]).
/// Connections are opened lazily, on first use.
pub fn build_pool(args: &DatabaseArgs) -> Result<Pool> {
    let target = Target::parse(&args.database_url).map_err(Error::Config)?;
    let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
    manager_config.recycling_method = RecyclingMethod::CustomFunction(Box::new(|conn| {
        conn.batch_execute(RESET_ON_RETURN).boxed()
    }));
    manager_config.custom_setup = Box::new(move |_url| {
        let target = target.clone();
        async move { target.connect().await }.boxed()
    });
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        &args.database_url,
        manager_config,
    );
    let max_lifetime = args.db_max_lifetime;
    let pool = Pool::builder(manager)
        .max_size(args.db_pool_size)
        .wait_timeout(Some(args.db_wait_timeout))
        .create_timeout(Some(args.db_create_timeout))
        .recycle_timeout(Some(args.db_recycle_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .pre_recycle(Hook::sync_fn(move |_, metrics| {
            if metrics.age() > max_lifetime {
                Err(HookError::message(
                    "connection reached its maximum lifetime",
                ))
            } else {
                Ok(())
            }
        }))
        .build()?;
    Ok(pool)
}

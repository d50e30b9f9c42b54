//! Every SQL statement of the messaging service, each run on a connection the caller holds
//! in the tenant's scope. The longer statements are `.sql` files beside this one.

use futures::future::BoxFuture;
use hafen_store::{AsyncPgConnection, Databases, TenantId};
use uuid::Uuid;

use crate::error::Error;

mod conversations;
mod log;
mod messages;

pub use conversations::*;
pub use log::*;
pub use messages::*;

/// Runs `f` in a transaction in `tenant`'s scope, on a connection of `databases`.
pub async fn scoped<R, F>(databases: &Databases, tenant: Uuid, f: F) -> Result<R, Error>
where
    F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, Error>>,
{
    let tenant = TenantId::from(tenant);
    let pool = databases.tenant_pool(&tenant).await?;
    hafen_store::with_tenant(&pool, &tenant, f).await
}

/// A pooled connection to `tenant`'s database, not yet in its scope (for [`events_after`]).
pub async fn connection(
    databases: &Databases,
    tenant: Uuid,
) -> Result<hafen_store::PooledConnection, Error> {
    Ok(databases.tenant_connection(&TenantId::from(tenant)).await?)
}

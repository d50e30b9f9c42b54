//! The tenant service against real PostgreSQL, over TLS (DC2, OC6, TM3, BX3, GR2, GR3, GR4).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use hafen_platform::status;
use hafen_proto::tenant::v1 as pb;
use hafen_proto::tenant::v1::tenant_service_client::TenantServiceClient;
use hafen_store::TenantId;
use hafen_tenant::tenants::{FailPoint, Tenants};
use hafen_testkit::{Channel, TestDatabase, TestSecrets, TestServer};
use tonic::Code;

/// A running tenant service with its database and secrets.
struct Stack {
    secrets: TestSecrets,
    db: TestDatabase,
    _server: TestServer,
    client: TenantServiceClient<Channel>,
}

impl Stack {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    async fn start_with(placements: &[(&str, &TestDatabase)]) -> Self {
        let secrets = TestSecrets::generate();
        let db = TestDatabase::create().await;
        let config = secrets.tenant_config(&db, placements);
        let server = TestServer::spawn(|l, s| hafen_tenant::serve(config, l, s)).await;
        let client = TenantServiceClient::new(server.channel(&secrets).await);
        Self {
            secrets,
            db,
            _server: server,
            client,
        }
    }

    async fn create(&mut self, slug: &str) -> Result<pb::CreateTenantResponse, tonic::Status> {
        let request = self.secrets.operator(create_request(slug));
        self.client
            .create_tenant(request)
            .await
            .map(tonic::Response::into_inner)
    }
}

fn create_request(slug: &str) -> pb::CreateTenantRequest {
    pb::CreateTenantRequest {
        request_id: String::new(),
        slug: slug.to_owned(),
        display_name: format!("Org {slug}"),
        owner_username: "owner".to_owned(),
        owner_display_name: "The Owner".to_owned(),
        owner_password: "correct horse battery".to_owned(),
        dpa_version: "2025-01".to_owned(),
        region: "eu-central".to_owned(),
        database: String::new(),
    }
}

#[derive(QueryableByName, Debug)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn count(conn: &mut AsyncPgConnection, sql: &str, bind: &str) -> i64 {
    diesel::sql_query(sql)
        .bind::<diesel::sql_types::Text, _>(bind)
        .get_result::<Count>(conn)
        .await
        .unwrap()
        .n
}

async fn schemas(db: &TestDatabase, name: &str) -> i64 {
    count(
        &mut db.connect().await,
        "SELECT count(*) AS n FROM pg_namespace WHERE nspname = $1",
        name,
    )
    .await
}

async fn tenant_schemas(db: &TestDatabase) -> i64 {
    count(
        &mut db.connect().await,
        "SELECT count(*) AS n FROM pg_namespace WHERE nspname LIKE $1",
        "t\\_%",
    )
    .await
}

async fn roles(db: &TestDatabase, name: &str) -> i64 {
    count(
        &mut db.connect().await,
        "SELECT count(*) AS n FROM pg_roles WHERE rolname = $1",
        name,
    )
    .await
}

async fn control_rows(db: &TestDatabase, table: &str) -> i64 {
    count(
        &mut db.connect().await,
        &format!("SELECT count(*) AS n FROM hafen.{table} WHERE $1 = $1"),
        "",
    )
    .await
}

async fn key_rows(db: &TestDatabase, table: &str) -> i64 {
    count(
        &mut db.keystore().connect().await,
        &format!("SELECT count(*) AS n FROM hafen_keys.{table} WHERE $1 = $1"),
        "",
    )
    .await
}

fn reason(status: &tonic::Status) -> String {
    status::reason(status).unwrap_or_default()
}

fn field(status: &tonic::Status) -> String {
    status::metadata(status, "field").unwrap_or_default()
}

fn tenant_id(created: &pb::CreateTenantResponse) -> TenantId {
    let id = created
        .tenant
        .as_ref()
        .unwrap()
        .tenant_id
        .parse::<uuid::Uuid>()
        .unwrap();
    TenantId::from(id)
}

/// The domain service over `db`, as `serve` builds it, for failure injection.
fn domain(
    secrets: &TestSecrets,
    db: &TestDatabase,
    placements: &[(&str, &TestDatabase)],
) -> Tenants {
    let config = secrets.tenant_config(db, placements);
    Tenants::new(
        hafen_store::Databases::new(&config.databases).unwrap(),
        secrets.master_key(),
        Some(secrets.master_key_file()),
        config.policy(),
        None,
    )
}

fn domain_input(slug: &str, database: &str) -> hafen_tenant::tenants::NewTenantInput {
    use hafen_store::accounts::{DisplayName, Username};
    hafen_tenant::tenants::NewTenantInput {
        request_id: None,
        slug: hafen_tenant::tenants::Slug::parse(slug).unwrap(),
        display_name: DisplayName::parse("Org").unwrap(),
        owner_username: Username::parse("owner").unwrap(),
        owner_display_name: DisplayName::parse("Owner").unwrap(),
        owner_password: zeroize::Zeroizing::new("correct horse battery".to_owned()),
        dpa_version: "2025-01".to_owned(),
        region: "eu-central".to_owned(),
        database: database.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dc2_create_tenant_provisions_schema_role_key_and_owner() {
    let mut stack = Stack::start().await;
    let created = stack.create("acme").await.unwrap();
    let tenant = tenant_id(&created);
    assert_eq!(schemas(&stack.db, &tenant.schema()).await, 1);
    assert_eq!(roles(&stack.db, &tenant.schema()).await, 1);
    assert_eq!(key_rows(&stack.db, "tenant_keys").await, 1);
    assert_eq!(
        created.owner_chat_code.len(),
        10,
        "the owner's first chat code is shown once"
    );
    assert!(!created.owner_chat_code_id.is_empty());

    // The schema belongs to the tenant's role; the login role owns nothing in it.
    let mut conn = stack.db.connect().await;
    let owned_by_tenant = count(
        &mut conn,
        "SELECT count(*) AS n FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner \
         WHERE n.nspname = $1 AND r.rolname = n.nspname",
        &tenant.schema(),
    )
    .await;
    assert_eq!(owned_by_tenant, 1);
    let owned_by_app = count(
        &mut conn,
        "SELECT count(*) AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND pg_get_userbyid(c.relowner) = current_user",
        &tenant.schema(),
    )
    .await;
    assert_eq!(
        owned_by_app, 0,
        "no table in the tenant schema belongs to the login role"
    );

    // The key is stored wrapped in the key store, under the master key's current version, and
    // unwraps with the master key for this tenant only.
    let mut keys = stack.db.keystore().connect().await;
    let (version, wrapped) = hafen_store::keystore::tenant_key(&mut keys, tenant.as_uuid())
        .await
        .unwrap()
        .unwrap();
    let master = stack.secrets.master_key();
    assert_eq!(version, master.current_version());
    let context = hafen_tenant::tenants::tenant_key_context(&tenant);
    assert!(master.unwrap(version, &wrapped, &context).is_ok());
    assert!(master.unwrap(version, &wrapped, b"another tenant").is_err());

    // The owner account exists, with a bcrypt hash and the chat code stored only as a hash.
    let owner_rows = hafen_store::with_tenant(
        &hafen_store::pool::build_pool(&stack.db.args()).unwrap(),
        &tenant,
        |conn| {
            Box::pin(async move {
                use diesel::QueryDsl;
                use hafen_store::schema::{chat_codes, users};
                let hashes: Vec<(String, String)> = users::table
                    .select((users::password_hash, users::role))
                    .load(conn)
                    .await?;
                let codes: Vec<Vec<u8>> = chat_codes::table
                    .select(chat_codes::code_hash)
                    .load(conn)
                    .await?;
                Ok::<_, hafen_store::Error>((hashes, codes))
            })
        },
    )
    .await
    .unwrap();
    let (users, codes) = owner_rows;
    assert_eq!(users.len(), 1);
    assert!(users[0].0.starts_with("$2b$"), "bcrypt");
    assert_eq!(users[0].1, "owner");
    assert_eq!(codes.len(), 1);
    assert!(
        !codes[0]
            .windows(10)
            .any(|w| w == created.owner_chat_code.as_bytes()),
        "the code itself is not stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gr2_accepted_dpa_is_recorded_and_returned() {
    let mut stack = Stack::start().await;
    let before = chrono::Utc::now().timestamp();
    let created = stack.create("dpa-org").await.unwrap();
    let request = stack.secrets.operator(pb::GetTenantRequest {
        tenant_id: created.tenant.as_ref().unwrap().tenant_id.clone(),
        slug: String::new(),
    });
    let tenant = stack.client.get_tenant(request).await.unwrap().into_inner();
    let dpa = tenant.dpa.unwrap();
    assert_eq!(dpa.version, "2025-01");
    assert_eq!(
        dpa.accepted_by_user_id, created.owner_user_id,
        "the owner accepted it"
    );
    let accepted = dpa.accept_time.unwrap().seconds;
    assert!(accepted >= before - 1 && accepted <= chrono::Utc::now().timestamp() + 1);
    assert_eq!(tenant.region, "eu-central");
    assert_eq!(tenant.state, pb::TenantState::Active as i32);
    assert_eq!(
        tenant.settings.unwrap().retention_days,
        730,
        "privacy by default"
    );

    let by_slug = stack
        .client
        .get_tenant(stack.secrets.operator(pb::GetTenantRequest {
            tenant_id: String::new(),
            slug: "dpa-org".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_slug.tenant_id, tenant.tenant_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn dc2_failure_after_schema_creation_leaves_nothing_behind() {
    let secrets = TestSecrets::generate();
    let db = TestDatabase::create().await;
    let tenants = domain(&secrets, &db, &[]);
    for point in [FailPoint::AfterSchema, FailPoint::BeforeCommit] {
        tenants.set_fail_point(Some(point));
        let err = tenants
            .create(domain_input("doomed", "default"))
            .await
            .expect_err("the injected failure surfaces");
        let hafen_tenant::Error::Injected(_, tenant) = err else {
            panic!("unexpected error {err}");
        };
        assert_eq!(tenant_schemas(&db).await, 0, "no schema ({point:?})");
        // Roles are cluster-wide: look for this tenant's own.
        assert_eq!(roles(&db, &tenant.schema()).await, 0, "no role ({point:?})");
        assert_eq!(control_rows(&db, "tenants").await, 0, "no row ({point:?})");
        assert_eq!(key_rows(&db, "tenant_keys").await, 0, "no key ({point:?})");
    }
    tenants.set_fail_point(None);
    tenants
        .create(domain_input("doomed", "default"))
        .await
        .expect("the same slug works once nothing fails");
}

#[tokio::test(flavor = "multi_thread")]
async fn dc2_fifty_tenants_provisioned_concurrently_get_distinct_schemas() {
    let stack = Stack::start().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = stack.client.clone();
        let request = stack
            .secrets
            .operator(create_request(&format!("tenant-{i:02}")));
        tasks.push(tokio::spawn(async move {
            client
                .create_tenant(request)
                .await
                .map(tonic::Response::into_inner)
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let created = task.await.unwrap().expect("every provisioning succeeds");
        assert!(ids.insert(tenant_id(&created)));
    }
    assert_eq!(tenant_schemas(&stack.db).await, 50);
    for id in &ids {
        assert_eq!(schemas(&stack.db, &id.schema()).await, 1);
    }
    assert_eq!(key_rows(&stack.db, "tenant_keys").await, 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx3_a_tenant_scope_cannot_read_another_tenant_or_run_unscoped() {
    let mut stack = Stack::start().await;
    let a = tenant_id(&stack.create("tenant-a").await.unwrap());
    let b = tenant_id(&stack.create("tenant-b").await.unwrap());
    let pool = hafen_store::pool::build_pool(&stack.db.args()).unwrap();

    // Inside A's scope, its own table is readable…
    let own: i64 = hafen_store::with_tenant(&pool, &a, |conn| {
        Box::pin(async move {
            let row: Count = diesel::sql_query("SELECT count(*) AS n FROM users")
                .get_result(conn)
                .await?;
            Ok::<_, hafen_store::Error>(row.n)
        })
    })
    .await
    .unwrap();
    assert_eq!(own, 1);

    // …B's is not, even by its qualified name.
    let other = b.schema();
    let err = hafen_store::with_tenant(&pool, &a, move |conn| {
        Box::pin(async move {
            diesel::sql_query(format!("SELECT count(*) AS n FROM {other}.users"))
                .get_result::<Count>(conn)
                .await?;
            Ok::<_, hafen_store::Error>(())
        })
    })
    .await
    .expect_err("cross-tenant read");
    assert!(
        err.to_string().contains("permission denied for schema"),
        "{err}"
    );

    // Without a scope, tenant tables are out of reach too.
    let mut conn = stack.db.connect().await;
    let err = diesel::sql_query(format!("SELECT count(*) AS n FROM {}.users", a.schema()))
        .get_result::<Count>(&mut conn)
        .await
        .expect_err("unscoped read");
    assert!(
        err.to_string().contains("permission denied for schema"),
        "{err}"
    );
    let err = diesel::sql_query("SELECT count(*) AS n FROM users")
        .get_result::<Count>(&mut conn)
        .await
        .expect_err("unscoped, unqualified");
    assert!(err.to_string().contains("does not exist"), "{err}");

    // Inside a scope, the control plane is out of reach as well.
    let err = hafen_store::with_tenant(&pool, &a, |conn| {
        Box::pin(async move {
            diesel::sql_query("SELECT count(*) AS n FROM hafen.tenants")
                .get_result::<Count>(conn)
                .await?;
            Ok::<_, hafen_store::Error>(())
        })
    })
    .await
    .expect_err("tenant scope reading the control plane");
    assert!(err.to_string().contains("permission denied"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tm3_a_tenant_placed_on_another_database_lives_only_there() {
    let second = TestDatabase::create_empty().await;
    let mut stack = Stack::start_with(&[("white-label", &second)]).await;
    let mut request = create_request("white");
    request.database = "white-label".into();
    let created = stack
        .client
        .create_tenant(stack.secrets.operator(request))
        .await
        .unwrap()
        .into_inner();
    let tenant = tenant_id(&created);
    assert_eq!(created.tenant.as_ref().unwrap().database, "white-label");
    assert_eq!(
        schemas(&second, &tenant.schema()).await,
        1,
        "schema on the placement"
    );
    assert_eq!(
        schemas(&stack.db, &tenant.schema()).await,
        0,
        "none on the main database"
    );
    assert_eq!(
        control_rows(&stack.db, "tenants").await,
        1,
        "the control plane stays main"
    );

    // Its data is reachable through its own database only.
    let pool =
        hafen_store::pool::build_pool(&hafen_store::DatabaseArgs::new(second.url())).unwrap();
    let users: i64 = hafen_store::with_tenant(&pool, &tenant, |conn| {
        Box::pin(async move {
            let row: Count = diesel::sql_query("SELECT count(*) AS n FROM users")
                .get_result(conn)
                .await?;
            Ok::<_, hafen_store::Error>(row.n)
        })
    })
    .await
    .unwrap();
    assert_eq!(users, 1);

    // Deleting it clears the placement database as well.
    stack
        .client
        .delete_tenant(stack.secrets.operator(pb::DeleteTenantRequest {
            tenant_id: tenant.to_string(),
            confirm_slug: "white".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(schemas(&second, &tenant.schema()).await, 0);
    assert_eq!(roles(&second, &tenant.schema()).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tm3_failed_provisioning_on_another_database_leaves_nothing_on_either() {
    let secrets = TestSecrets::generate();
    let db = TestDatabase::create().await;
    let second = TestDatabase::create_empty().await;
    let tenants = domain(&secrets, &db, &[("second", &second)]);
    tenants.set_fail_point(Some(FailPoint::BeforeCommit));
    let err = tenants
        .create(domain_input("split", "second"))
        .await
        .expect_err("injected");
    let hafen_tenant::Error::Injected(_, tenant) = err else {
        panic!("unexpected error {err}");
    };
    assert_eq!(roles(&second, &tenant.schema()).await, 0);
    assert_eq!(tenant_schemas(&second).await, 0);
    assert_eq!(tenant_schemas(&db).await, 0);
    assert_eq!(control_rows(&db, "tenants").await, 0);
    let prepared = count(
        &mut second.connect().await,
        "SELECT count(*) AS n FROM pg_prepared_xacts WHERE database = current_database() AND $1 = $1",
        "",
    )
    .await;
    assert_eq!(prepared, 0, "the prepared transaction was rolled back");
}

#[tokio::test(flavor = "multi_thread")]
async fn gr3_deletion_leaves_no_schema_role_or_key_and_logs_once() {
    let mut stack = Stack::start().await;
    let created = stack.create("goner").await.unwrap();
    let tenant = tenant_id(&created);
    let deleted = stack
        .client
        .delete_tenant(stack.secrets.operator(pb::DeleteTenantRequest {
            tenant_id: tenant.to_string(),
            confirm_slug: "goner".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.tenant_id, tenant.to_string());
    assert!(deleted.delete_time.is_some());

    assert_eq!(schemas(&stack.db, &tenant.schema()).await, 0);
    assert_eq!(roles(&stack.db, &tenant.schema()).await, 0);
    let mut conn = stack.db.keystore().connect().await;
    assert!(
        hafen_store::keystore::tenant_key(&mut conn, tenant.as_uuid())
            .await
            .unwrap()
            .is_none(),
        "the tenant key is destroyed"
    );
    assert_eq!(
        hafen_store::keystore::deletion_log_entries(&mut conn, tenant.as_uuid())
            .await
            .unwrap(),
        1
    );

    // The record keeps ids and times only; the organisation's names are gone.
    let record = stack
        .client
        .get_tenant(stack.secrets.operator(pb::GetTenantRequest {
            tenant_id: tenant.to_string(),
            slug: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.state, pb::TenantState::Deleted as i32);
    assert_eq!(
        record.delete_time, deleted.delete_time,
        "the stored time was returned"
    );
    assert!(record.slug.is_empty() && record.display_name.is_empty());
    assert!(record.delete_time.is_some());

    // A second delete finds nothing; the slug is free again.
    let again = stack
        .client
        .delete_tenant(stack.secrets.operator(pb::DeleteTenantRequest {
            tenant_id: tenant.to_string(),
            confirm_slug: "goner".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert_eq!(
        hafen_store::keystore::deletion_log_entries(&mut conn, tenant.as_uuid())
            .await
            .unwrap(),
        1,
        "still one entry"
    );
    stack
        .create("goner")
        .await
        .expect("the slug can be used again");
}

#[tokio::test(flavor = "multi_thread")]
async fn dc2_migrate_all_upgrades_an_old_tenant_and_is_a_no_op_the_second_time() {
    use diesel::Connection;
    use diesel_migrations::MigrationHarness;

    let mut stack = Stack::start().await;
    let old = tenant_id(&stack.create("old-tenant").await.unwrap());
    let current = tenant_id(&stack.create("new-tenant").await.unwrap());

    // Take the old tenant back to before its newest migration.
    let url = stack.db.url().to_owned();
    let schema = old.schema();
    tokio::task::spawn_blocking(move || {
        let mut conn = hafen_store::connect::establish_sync(&url).unwrap();
        conn.transaction(|conn| {
            diesel::RunQueryDsl::execute(
                diesel::sql_query(
                    "SELECT set_config('role', $1, true), set_config('search_path', $1, true)",
                )
                .bind::<diesel::sql_types::Text, _>(&schema),
                conn,
            )?;
            conn.revert_last_migration(hafen_store::tenancy::TENANT_MIGRATIONS)
                .map_err(diesel::result::Error::QueryBuilderError)?;
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    })
    .await
    .unwrap();

    let options = hafen_tenant::migrate::Options {
        concurrency: 2,
        progress: false,
    };
    let first = hafen_tenant::migrate::migrate_all(
        stack.db.url(),
        Some(stack.db.keystore().url()),
        &Default::default(),
        &options,
    )
    .await
    .unwrap();
    assert_eq!(first.tenants, 2);
    assert_eq!(first.upgraded, 1, "the old tenant is brought up to date");
    assert_eq!(first.current, 1, "the current one is left alone");
    assert!(first.failed.is_empty());

    let second = hafen_tenant::migrate::migrate_all(
        stack.db.url(),
        Some(stack.db.keystore().url()),
        &Default::default(),
        &options,
    )
    .await
    .unwrap();
    assert_eq!(
        (second.upgraded, second.current),
        (0, 2),
        "a no-op the second time"
    );
    assert!(second.control_plane.is_empty());
    let _ = current;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_status_and_writes_nothing() {
    let mut stack = Stack::start().await;

    let mut cases: Vec<(pb::CreateTenantRequest, Code, &str, &str)> = Vec::new();
    let bad_slug = create_request("Bad Slug!");
    cases.push((bad_slug, Code::InvalidArgument, "INVALID_FIELD", "slug"));
    let mut short = create_request("ok-slug");
    short.owner_password = "short".into();
    cases.push((
        short,
        Code::InvalidArgument,
        "PASSWORD_TOO_WEAK",
        "owner_password",
    ));
    let mut long = create_request("ok-slug");
    long.owner_password = "x".repeat(73);
    cases.push((
        long,
        Code::InvalidArgument,
        "PASSWORD_TOO_LONG",
        "owner_password",
    ));
    let mut dpa = create_request("ok-slug");
    dpa.dpa_version = "1999".into();
    cases.push((dpa, Code::InvalidArgument, "INVALID_FIELD", "dpa_version"));
    let mut placement = create_request("ok-slug");
    placement.database = "nowhere".into();
    cases.push((
        placement,
        Code::InvalidArgument,
        "INVALID_FIELD",
        "database",
    ));
    let mut user = create_request("ok-slug");
    user.owner_username = "a b".into();
    cases.push((
        user,
        Code::InvalidArgument,
        "INVALID_FIELD",
        "owner_username",
    ));
    let mut request_id = create_request("ok-slug");
    request_id.request_id = "not-a-uuid".into();
    cases.push((
        request_id,
        Code::InvalidArgument,
        "INVALID_FIELD",
        "request_id",
    ));
    for (request, code, expected_reason, expected_field) in cases {
        let err = stack
            .client
            .create_tenant(stack.secrets.operator(request))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert_eq!(reason(&err), expected_reason, "{err:?}");
        assert_eq!(field(&err), expected_field, "{err:?}");
    }
    assert_eq!(
        control_rows(&stack.db, "tenants").await,
        0,
        "nothing written"
    );
    assert_eq!(tenant_schemas(&stack.db).await, 0, "nothing provisioned");

    // Missing and wrong platform tokens.
    let err = stack
        .client
        .create_tenant(create_request("ok-slug"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "UNAUTHENTICATED");
    assert!(err.message().contains("missing"), "{err:?}");
    let mut wrong = tonic::Request::new(create_request("ok-slug"));
    wrong.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", "x".repeat(43)).parse().unwrap(),
    );
    let err = stack.client.create_tenant(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "UNAUTHENTICATED");
    assert!(err.message().contains("unknown"), "{err:?}");
    let err = stack
        .client
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "every RPC needs the token"
    );
    assert_eq!(control_rows(&stack.db, "tenants").await, 0);

    // Duplicate slug.
    stack.create("taken").await.unwrap();
    let err = stack.create("taken").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(reason(&err), "ALREADY_EXISTS");
    assert_eq!(field(&err), "slug");
    assert_eq!(control_rows(&stack.db, "tenants").await, 1);
    assert_eq!(tenant_schemas(&stack.db).await, 1);

    // Unknown and malformed ids.
    let unknown = uuid::Uuid::now_v7().to_string();
    let err = stack
        .client
        .get_tenant(stack.secrets.operator(pb::GetTenantRequest {
            tenant_id: unknown.clone(),
            slug: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "NOT_FOUND")
    );
    let err = stack
        .client
        .get_tenant(stack.secrets.operator(pb::GetTenantRequest {
            tenant_id: "42".into(),
            slug: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field(&err).as_str()),
        (Code::InvalidArgument, "tenant_id")
    );
    let err = stack
        .client
        .delete_tenant(stack.secrets.operator(pb::DeleteTenantRequest {
            tenant_id: unknown,
            confirm_slug: "x".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn cb5_ul2_cb7_settings_are_validated_and_applied_by_field_mask() {
    let mut stack = Stack::start().await;
    let created = stack.create("settings-org").await.unwrap();
    let id = created.tenant.unwrap().tenant_id;
    let update = |settings: pb::TenantSettings, paths: &[&str]| pb::UpdateTenantSettingsRequest {
        tenant_id: id.clone(),
        settings: Some(settings),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };

    let err = stack
        .client
        .update_tenant_settings(stack.secrets.operator(update(
            pb::TenantSettings {
                retention_days: 731,
                ..Default::default()
            },
            &["retention_days"],
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "RETENTION_TOO_LONG");
    assert_eq!(field(&err), "settings.retention_days");

    let err = stack
        .client
        .update_tenant_settings(stack.secrets.operator(update(
            pb::TenantSettings {
                masking: Some(pb::MaskingSettings {
                    custom_patterns: vec![pb::CustomPattern {
                        name: "broken".into(),
                        regex: "[unclosed".into(),
                        replacement: String::new(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            &["masking.custom_patterns"],
        )))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_FIELD");
    assert_eq!(field(&err), "settings.masking.custom_patterns[0].regex");

    let err = stack
        .client
        .update_tenant_settings(stack.secrets.operator(update(
            pb::TenantSettings {
                privacy_policy_url: "http://insecure.example/privacy".into(),
                ..Default::default()
            },
            &["privacy_policy_url"],
        )))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "settings.privacy_policy_url");

    // Nothing of the refused updates was stored.
    let unchanged = stack
        .client
        .get_tenant(stack.secrets.operator(pb::GetTenantRequest {
            tenant_id: id.clone(),
            slug: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(unchanged.retention_days, 730);
    assert!(unchanged.masking.unwrap().custom_patterns.is_empty());

    let tenant = stack
        .client
        .update_tenant_settings(stack.secrets.operator(update(
            pb::TenantSettings {
                retention_days: 90,
                privacy_policy_url: "https://example.eu/privacy".into(),
                masking: Some(pb::MaskingSettings {
                    email: true,
                    custom_patterns: vec![pb::CustomPattern {
                        name: "customer-number".into(),
                        regex: r"K-\d{6}".into(),
                        replacement: "[customer]".into(),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            &["retention_days", "privacy_policy_url", "masking"],
        )))
        .await
        .unwrap()
        .into_inner();
    let settings = tenant.settings.unwrap();
    assert_eq!(settings.retention_days, 90);
    assert_eq!(settings.privacy_policy_url, "https://example.eu/privacy");
    let masking = settings.masking.unwrap();
    assert!(masking.email);
    assert_eq!(masking.custom_patterns.len(), 1);
    assert!(
        !settings.features.unwrap().webchat,
        "untouched: still off (UL5)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_tenants_pages_through_everything_once() {
    let mut stack = Stack::start().await;
    for i in 0..7 {
        stack.create(&format!("page-{i}")).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = stack
            .client
            .list_tenants(stack.secrets.operator(pb::ListTenantsRequest {
                page_size: 3,
                page_token: token.clone(),
                show_deleted: false,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.tenants.len() <= 3);
        seen.extend(page.tenants.into_iter().map(|t| t.slug));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    assert_eq!(seen, expected, "oldest first, each once");

    let err = stack
        .client
        .list_tenants(stack.secrets.operator(pb::ListTenantsRequest {
            page_size: 3,
            page_token: "bogus".into(),
            show_deleted: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "page_token");
}

#[tokio::test(flavor = "multi_thread")]
async fn create_tenant_retry_with_the_same_request_id_returns_the_first_tenant() {
    let mut stack = Stack::start().await;
    let mut request = create_request("retry-org");
    request.request_id = uuid::Uuid::now_v7().to_string();
    let first = stack
        .client
        .create_tenant(stack.secrets.operator(request.clone()))
        .await
        .unwrap()
        .into_inner();
    let second = stack
        .client
        .create_tenant(stack.secrets.operator(request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.tenant, second.tenant);
    assert_eq!(first.owner_user_id, second.owner_user_id);
    assert_eq!(
        second.owner_chat_code.len(),
        10,
        "a fresh code replaces the unused one"
    );
    assert_ne!(first.owner_chat_code, second.owner_chat_code);
    assert_eq!(tenant_schemas(&stack.db).await, 1, "provisioned once");

    request.display_name = "Something else".into();
    let err = stack
        .client
        .create_tenant(stack.secrets.operator(request))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "REQUEST_ID_CONFLICT");
}

#[tokio::test(flavor = "multi_thread")]
async fn tm3_provisioning_interrupted_between_the_two_commits_is_resolved() {
    use diesel_async::SimpleAsyncConnection;

    let db = TestDatabase::create().await;
    let second = TestDatabase::create_empty().await;
    // Two provisionings a crash left prepared on the placement database: one whose tenant
    // row was committed on the main database, one whose row never was.
    let committed = TenantId::generate();
    let orphan = TenantId::generate();
    for tenant in [committed, orphan] {
        let name = tenant.schema();
        let mut conn = second.connect().await;
        conn.batch_execute(&format!(
            "BEGIN; CREATE ROLE {name} NOLOGIN; GRANT {name} TO CURRENT_USER; \
             CREATE SCHEMA {name} AUTHORIZATION {name}; \
             PREPARE TRANSACTION 'hafen_provision_{name}';"
        ))
        .await
        .unwrap();
    }
    db.connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO hafen.tenants (id, slug, display_name, status, region, dpa_version, \
             dpa_accepted_at, dpa_accepted_by, database_name) VALUES ('{}', 'kept', 'Kept', \
             'active', 'eu-central', '2025-01', now(), '{}', 'second')",
            committed.as_uuid(),
            uuid::Uuid::now_v7()
        ))
        .await
        .unwrap();

    // In the key store: the committed tenant's key, prepared; the orphan's, prepared; and the
    // destruction of a deleted tenant's keys and of a live one's (its deletion failed).
    let deleted = TenantId::generate();
    let live = TenantId::generate();
    db.connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO hafen.tenants (id, slug, display_name, status, region, dpa_version, \
             dpa_accepted_at, dpa_accepted_by, database_name, deleted_at) VALUES \
             ('{}', NULL, NULL, 'deleted', 'eu-central', '2025-01', now(), '{}', 'default', now()), \
             ('{}', 'live', 'Live', 'active', 'eu-central', '2025-01', now(), '{}', 'default', NULL)",
            deleted.as_uuid(),
            uuid::Uuid::now_v7(),
            live.as_uuid(),
            uuid::Uuid::now_v7()
        ))
        .await
        .unwrap();
    let keystore = db.keystore();
    for tenant in [committed, orphan, deleted, live] {
        keystore
            .connect()
            .await
            .batch_execute(&format!(
                "INSERT INTO hafen_keys.tenant_keys (tenant_id, key_version, wrapped_key) \
                 VALUES ('{}', 1, '\\x00')",
                tenant.as_uuid()
            ))
            .await
            .unwrap();
    }
    for (tenant, statement, gid) in [
        (
            committed,
            "INSERT INTO hafen_keys.user_keys (tenant_id, user_id, wrapped_key) VALUES ('{t}', '{t}', '\\x00')",
            "provision",
        ),
        (
            orphan,
            "INSERT INTO hafen_keys.user_keys (tenant_id, user_id, wrapped_key) VALUES ('{t}', '{t}', '\\x00')",
            "provision",
        ),
        (
            deleted,
            "DELETE FROM hafen_keys.tenant_keys WHERE tenant_id = '{t}'",
            "delete",
        ),
        (
            live,
            "DELETE FROM hafen_keys.tenant_keys WHERE tenant_id = '{t}'",
            "delete",
        ),
    ] {
        let statement = statement.replace("{t}", &tenant.as_uuid().to_string());
        keystore
            .connect()
            .await
            .batch_execute(&format!(
                "BEGIN; {statement}; PREPARE TRANSACTION 'hafen_keys_{gid}_{}';",
                tenant.schema()
            ))
            .await
            .unwrap();
    }

    let placements = [("second".to_owned(), second.url().to_owned())].into();
    let resolved = hafen_tenant::tenants::resolve_prepared(
        db.url(),
        keystore.url(),
        &placements,
        std::time::Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(resolved, 6);
    let mut keys = keystore.connect().await;
    let user_keys = |tenant: TenantId| {
        format!(
            "SELECT count(*) AS n FROM hafen_keys.user_keys WHERE tenant_id = '{}' AND $1 = $1",
            tenant.as_uuid()
        )
    };
    assert_eq!(
        count(&mut keys, &user_keys(committed), "").await,
        1,
        "committed: its row exists"
    );
    assert_eq!(
        count(&mut keys, &user_keys(orphan), "").await,
        0,
        "rolled back: no row"
    );
    for (tenant, left) in [(deleted, 0), (live, 1)] {
        assert!(
            hafen_store::keystore::tenant_key(&mut keys, tenant.as_uuid())
                .await
                .unwrap()
                .is_some()
                == (left == 1),
            "a deleted tenant's keys go, a live one's stay"
        );
    }
    assert_eq!(
        schemas(&second, &committed.schema()).await,
        1,
        "committed: its row exists"
    );
    assert_eq!(
        schemas(&second, &orphan.schema()).await,
        0,
        "rolled back: no row"
    );
    assert_eq!(roles(&second, &orphan.schema()).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx5_passwords_chat_codes_and_tokens_never_reach_the_logs() {
    let logs = hafen_testkit::LogCapture::install();
    let mut stack = Stack::start().await;
    let created = stack.create("quiet-org").await.unwrap();
    let mut bad = create_request("other-org");
    bad.owner_password = "x".repeat(73);
    let _ = stack
        .client
        .create_tenant(stack.secrets.operator(bad))
        .await;
    let mut wrong = tonic::Request::new(pb::ListTenantsRequest::default());
    let wrong_token = "w".repeat(43);
    wrong.metadata_mut().insert(
        "authorization",
        format!("Bearer {wrong_token}").parse().unwrap(),
    );
    let _ = stack.client.list_tenants(wrong).await;

    let logged = logs.contents();
    let tenant = created.tenant.unwrap().tenant_id;
    assert!(
        logged.contains(&tenant),
        "ids are logged: the capture works"
    );
    for secret in [
        "correct horse battery",
        created.owner_chat_code.as_str(),
        stack.secrets.platform_token(),
        wrong_token.as_str(),
        &"x".repeat(73),
    ] {
        assert!(!logged.contains(secret), "a secret reached the logs");
    }
}

/// Collects an export's chunks, checking offsets, size and hash; returns the archive.
async fn collect_archive(mut stream: tonic::Streaming<pb::ExportTenantResponse>) -> Vec<u8> {
    use sha2::Digest as _;
    let mut archive = Vec::new();
    let mut last = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(last.is_none(), "nothing after the last chunk");
        assert_eq!(chunk.offset, archive.len() as u64);
        archive.extend_from_slice(&chunk.data);
        if chunk.last_chunk {
            last = Some(chunk);
        }
    }
    let last = last.expect("a last chunk");
    assert_eq!(last.total_size, archive.len() as u64);
    assert_eq!(last.sha256, sha2::Sha256::digest(&archive).to_vec());
    archive
}

#[tokio::test(flavor = "multi_thread")]
async fn gr5_the_owner_exports_what_the_owner_may_read_and_nothing_else() {
    use hafen_proto::messaging::v1 as msg;
    use hafen_testkit::with_token;

    let stack = hafen_testkit::TestStack::start().await;
    let tenant = stack.create_tenant("export").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let login = |name: &'static str| {
        let (stack, tenant) = (&stack, &tenant);
        let owner = owner.clone();
        async move {
            let (member, session) = stack
                .create_logged_in_member(tenant, &owner, name, "member password 1")
                .await;
            (member.user_id, session.access_token)
        }
    };
    let (alice, alice_token) = login("alice").await;
    let (bob, bob_token) = login("bob").await;
    let mut messaging = stack.messaging_client().await;
    let conversation =
        |token: &str, kind: msg::ConversationKind, title: &str, members: Vec<String>| {
            with_token(
                token,
                msg::CreateConversationRequest {
                    kind: kind as i32,
                    title: title.into(),
                    member_user_ids: members,
                    ..Default::default()
                },
            )
        };
    let send = |token: &str, conversation: &str, body: &str| {
        with_token(
            token,
            msg::SendMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                conversation_id: conversation.into(),
                body: body.into(),
            },
        )
    };
    let team = messaging
        .create_conversation(conversation(
            &owner,
            msg::ConversationKind::Group,
            "team",
            vec![alice.clone()],
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    messaging
        .send_message(send(&owner, &team, "agenda for monday"))
        .await
        .unwrap();
    messaging
        .send_message(send(&alice_token, &team, "card 4111 1111 1111 1111 please"))
        .await
        .unwrap();
    let private = messaging
        .create_conversation(conversation(
            &alice_token,
            msg::ConversationKind::Direct,
            "",
            vec![bob.clone()],
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    messaging
        .send_message(send(&bob_token, &private, "between alice and bob only"))
        .await
        .unwrap();

    let mut tenants = stack.tenant_client().await;
    let stream = tenants
        .export_tenant(with_token(
            &owner,
            pb::ExportTenantRequest {
                chunk_size: 16 * 1024,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let archive = collect_archive(stream).await;
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).unwrap();
    let mut files = std::collections::BTreeMap::new();
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).unwrap();
        let name = file.name().unwrap().into_owned();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).unwrap();
        files.insert(name, text);
    }
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "README.txt",
            "conversations.json",
            &format!("messages/{team}.jsonl"),
            "tenant.json",
            "users.json",
        ],
        "the owner's conversation, and no other"
    );
    let all: String = files.values().cloned().collect();
    assert!(
        !all.contains("between alice and bob only"),
        "no private message of others"
    );
    assert!(
        !all.contains(&private),
        "not even the id of their conversation"
    );
    assert!(!all.contains("$2"), "no password hash");
    let messages: Vec<serde_json::Value> = files[&format!("messages/{team}.jsonl")]
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(messages[0]["body"], "agenda for monday", "decrypted");
    assert_eq!(
        messages[1]["body"], "card [card] please",
        "as stored: masked"
    );
    let users: serde_json::Value = serde_json::from_str(&files["users.json"]).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 3);
    let record: serde_json::Value = serde_json::from_str(&files["tenant.json"]).unwrap();
    assert_eq!(record["slug"], "export");

    // Nobody else exports: not a member, not the operator (TM2).
    let member = tenants
        .export_tenant(with_token(&alice_token, pb::ExportTenantRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(member.code(), Code::PermissionDenied);
    let operator = tenants
        .export_tenant(stack.secrets.operator(pb::ExportTenantRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(operator.code(), Code::PermissionDenied);
}

/// The files of a ZIP archive, by name.
fn unzip(archive: Vec<u8>) -> std::collections::BTreeMap<String, String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).unwrap();
    let mut files = std::collections::BTreeMap::new();
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).unwrap();
        let name = file.name().unwrap().into_owned();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).unwrap();
        files.insert(name, text);
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn cb9_a_user_exports_their_own_data_and_an_admin_any_users_on_request() {
    use hafen_proto::auth::v1 as auth_pb;
    use hafen_proto::messaging::v1 as msg;
    use hafen_testkit::with_token;

    let stack = hafen_testkit::TestStack::start().await;
    let tenant = stack.create_tenant("own-data").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let (lena, session) = stack
        .create_logged_in_member(&tenant, &owner, "lena", "lena password 1")
        .await;
    let (_, other) = stack
        .create_logged_in_member(&tenant, &owner, "otto", "otto password 1")
        .await;
    let mut messaging = stack.messaging_client().await;
    let team = messaging
        .create_conversation(with_token(
            &owner,
            msg::CreateConversationRequest {
                kind: msg::ConversationKind::Group as i32,
                title: "Team".into(),
                member_user_ids: vec![lena.user_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let send = |token: &str, body: &str| {
        with_token(
            token,
            msg::SendMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                conversation_id: team.clone(),
                body: body.into(),
            },
        )
    };
    messaging
        .send_message(send(&owner, "the owner's words"))
        .await
        .unwrap();
    messaging
        .send_message(send(
            &session.access_token,
            "lena's first, card 4111 1111 1111 1111",
        ))
        .await
        .unwrap();
    let second = messaging
        .send_message(send(&session.access_token, "lena's second"))
        .await
        .unwrap()
        .into_inner();
    messaging
        .delete_message(with_token(
            &session.access_token,
            msg::DeleteMessageRequest {
                message_id: second.message_id.clone(),
            },
        ))
        .await
        .unwrap();

    let mut tenants = stack.tenant_client().await;
    let export = |token: &str, user: &str| {
        with_token(
            token,
            pb::ExportUserDataRequest {
                user_id: user.into(),
                chunk_size: 16 * 1024,
            },
        )
    };
    let stream = tenants
        .export_user_data(export(&session.access_token, ""))
        .await
        .unwrap()
        .into_inner();
    let files = unzip(collect_archive(stream).await);
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "README.txt",
            "audit.jsonl",
            "devices.json",
            "memberships.json",
            "messages.jsonl",
            "profile.json"
        ]
    );
    let profile: serde_json::Value = serde_json::from_str(&files["profile.json"]).unwrap();
    assert_eq!(profile["username"], "lena");
    let messages: Vec<serde_json::Value> = files["messages.jsonl"]
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(messages.len(), 2, "hers only");
    assert_eq!(
        messages[0]["body"], "lena's first, card [card]",
        "decrypted, as stored"
    );
    assert_eq!(
        messages[1]["body"],
        serde_json::Value::Null,
        "deleted: no body"
    );
    let devices: serde_json::Value = serde_json::from_str(&files["devices.json"]).unwrap();
    assert_eq!(devices["chat_codes"][0]["device_label"], "lena's device");
    assert_eq!(devices["sessions"].as_array().unwrap().len(), 1);
    let memberships: serde_json::Value = serde_json::from_str(&files["memberships.json"]).unwrap();
    assert_eq!(memberships[0]["conversation_id"], team.as_str());
    let all: String = files.values().cloned().collect();
    assert!(!all.contains("the owner's words"), "no message of others");
    assert!(!all.contains("$2"), "no password hash");
    assert!(!all.contains(&session.access_token), "no token");

    // The audit events about her: her creation and her chat code at least (the relay
    // delivers them to the chain within moments).
    let audited = hafen_testkit::eventually(
        "lena's audit events",
        std::time::Duration::from_secs(20),
        || {
            let mut tenants = tenants.clone();
            let token = session.access_token.clone();
            async move {
                let stream = tenants
                    .export_user_data(export(&token, ""))
                    .await
                    .ok()?
                    .into_inner();
                let files = unzip(collect_archive(stream).await);
                let actions: Vec<String> = files["audit.jsonl"]
                    .lines()
                    .map(|line| {
                        serde_json::from_str::<serde_json::Value>(line).unwrap()["action"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned()
                    })
                    .collect();
                actions
                    .iter()
                    .any(|a| a == "auth.user.created")
                    .then_some(actions)
            }
        },
    )
    .await;
    assert!(audited.iter().all(|a| !a.is_empty()));

    // Another member's data is not hers to export; an admin exports it on request.
    let refused = tenants
        .export_user_data(export(&other.access_token, &lena.user_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let stream = tenants
        .export_user_data(export(&owner, &lena.user_id))
        .await
        .unwrap()
        .into_inner();
    let files = unzip(collect_archive(stream).await);
    assert_eq!(files["messages.jsonl"].lines().count(), 2);
    let refused = tenants
        .export_user_data(export(&owner, "no uuid"))
        .await
        .unwrap_err();
    assert_eq!(field(&refused), "user_id");
    let refused = tenants
        .export_user_data(stack.secrets.operator(pb::ExportUserDataRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // An erased user has nothing left to export.
    stack
        .auth_client()
        .await
        .erase_user(with_token(
            &owner,
            auth_pb::EraseUserRequest {
                user_id: lena.user_id.clone(),
            },
        ))
        .await
        .unwrap();
    let refused = tenants
        .export_user_data(export(&owner, &lena.user_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_tenant_errors_name_the_field_sent_and_choices_are_discoverable() {
    use hafen_testkit::with_token;
    let stack = hafen_testkit::TestStack::start().await;
    let tenant = stack.create_tenant("choices").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let mut tenants = stack.tenant_client().await;
    let err = tenants
        .get_tenant(with_token(
            &owner,
            pb::GetTenantRequest {
                slug: "choices".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status::metadata(&err, "field").as_deref(),
        Some("slug"),
        "the field that was sent"
    );
    let options = tenants
        .get_provisioning_options(stack.secrets.operator(pb::GetProvisioningOptionsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(options.dpa_versions, ["2025-01"]);
    assert_eq!(options.regions, ["eu-central"]);
    assert!(options.databases.is_empty(), "no placement databases here");
    let member = tenants
        .get_provisioning_options(with_token(&owner, pb::GetProvisioningOptionsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(member.code(), Code::PermissionDenied);
    // A megabyte of update mask comes back as a short message.
    let err = tenants
        .update_tenant_settings(with_token(
            &owner,
            pb::UpdateTenantSettingsRequest {
                settings: Some(pb::TenantSettings::default()),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["x".repeat(1_000_000)],
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status::metadata(&err, "field").as_deref(),
        Some("update_mask")
    );
    assert!(err.message().len() < 300);
}

//! diesel table definitions.
//!
//! Control-plane tables are qualified with their schema `hafen`, so they resolve whatever the
//! search path is — and stay out of reach inside a tenant scope, whose role has no rights on
//! `hafen`. Tenant tables are unqualified: they resolve to the tenant schema the transaction
//! entered (see [`crate::tenancy`]). Key-store tables are qualified with `hafen_keys`; they
//! live in the key store's database ([`crate::Databases::keystore`]), which may be another
//! server.

diesel::table! {
    hafen.tenants (id) {
        id -> Uuid,
        slug -> Nullable<Text>,
        display_name -> Nullable<Text>,
        status -> Text,
        region -> Text,
        dpa_version -> Text,
        dpa_accepted_at -> Timestamptz,
        dpa_accepted_by -> Uuid,
        database_name -> Text,
        create_request_id -> Nullable<Uuid>,
        settings -> Jsonb,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        deleted_at -> Nullable<Timestamptz>,
        audit_public_key -> Nullable<Bytea>,
    }
}

diesel::table! {
    hafen.sessions (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        user_id -> Uuid,
        chat_code_id -> Uuid,
        role -> Text,
        device_label -> Text,
        access_digest -> Bytea,
        access_expires_at -> Timestamptz,
        refresh_digest -> Bytea,
        refresh_expires_at -> Timestamptz,
        used_refresh_digests -> Array<Bytea>,
        created_at -> Timestamptz,
        refreshed_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
        revoke_reason -> Nullable<Text>,
    }
}

diesel::table! {
    users (id) {
        id -> Uuid,
        username -> Text,
        display_name -> Text,
        password_hash -> Text,
        role -> Text,
        status -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        deactivated_at -> Nullable<Timestamptz>,
        totp_secret -> Nullable<Bytea>,
        totp_pending -> Nullable<Bytea>,
        totp_enabled_at -> Nullable<Timestamptz>,
        create_request_id -> Nullable<Uuid>,
        totp_last_step -> Nullable<BigInt>,
    }
}

diesel::table! {
    chat_codes (id) {
        id -> Uuid,
        user_id -> Uuid,
        device_label -> Text,
        code_hash -> Bytea,
        state -> Text,
        created_at -> Timestamptz,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
        wipe_confirmed_at -> Nullable<Timestamptz>,
        issued_by -> Nullable<Uuid>,
    }
}

diesel::table! {
    hafen.erasure_requests (tenant_id, user_id) {
        tenant_id -> Uuid,
        user_id -> Uuid,
        requested_at -> Timestamptz,
        due_at -> Timestamptz,
    }
}

diesel::table! {
    conversations (id) {
        id -> Uuid,
        kind -> Text,
        title -> Text,
        creator_id -> Uuid,
        direct_key -> Nullable<Text>,
        last_sequence -> BigInt,
        create_request_id -> Nullable<Uuid>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        retention_days -> Nullable<Integer>,
        retention_updated_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    members (conversation_id, user_id) {
        conversation_id -> Uuid,
        user_id -> Uuid,
        joined_at -> Timestamptz,
    }
}

diesel::table! {
    messages (id) {
        id -> Uuid,
        conversation_id -> Uuid,
        sequence -> BigInt,
        sender_id -> Uuid,
        ciphertext -> Nullable<Bytea>,
        masked -> Bool,
        request_id -> Nullable<Uuid>,
        created_at -> Timestamptz,
        edited_at -> Nullable<Timestamptz>,
        deleted_at -> Nullable<Timestamptz>,
        event_id -> BigInt,
        erased -> Bool,
    }
}

diesel::table! {
    events (id) {
        id -> BigInt,
        conversation_id -> Uuid,
        kind -> Text,
        message_id -> Nullable<Uuid>,
        detail -> Nullable<Jsonb>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    event_counter (singleton) {
        singleton -> Bool,
        last_id -> BigInt,
    }
}

diesel::table! {
    legal_holds (id) {
        id -> Uuid,
        conversation_id -> Nullable<Uuid>,
        user_id -> Nullable<Uuid>,
        reason_code -> Text,
        set_by -> Uuid,
        set_at -> Timestamptz,
        lifted_by -> Nullable<Uuid>,
        lifted_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    purge_runs (id) {
        id -> Uuid,
        trigger -> Text,
        state -> Text,
        started_at -> Timestamptz,
        ended_at -> Nullable<Timestamptz>,
        heartbeat_at -> Timestamptz,
        messages_deleted -> BigInt,
        conversations_touched -> BigInt,
        held_skipped -> BigInt,
        triggered_by -> Nullable<Uuid>,
    }
}

diesel::table! {
    hafen.outbox (id) {
        id -> Uuid,
        tenant_id -> Nullable<Uuid>,
        event -> Bytea,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    hafen.audit_events (chain, sequence) {
        chain -> Uuid,
        sequence -> BigInt,
        event_id -> Uuid,
        occurred_at -> Timestamptz,
        actor_kind -> Text,
        actor_id -> Text,
        action -> Text,
        target_type -> Text,
        target_id -> Text,
        request_id -> Text,
        outcome -> Text,
        attributes -> Jsonb,
        prev_hash -> Bytea,
        hash -> Bytea,
        appended_at -> Timestamptz,
    }
}

diesel::table! {
    hafen.audit_heads (chain) {
        chain -> Uuid,
        sequence -> BigInt,
        hash -> Bytea,
    }
}

diesel::table! {
    hafen.service_facts (service, instance) {
        service -> Text,
        instance -> Uuid,
        reported_at -> Timestamptz,
        facts -> Jsonb,
    }
}

diesel::table! {
    hafen.audit_keys (chain) {
        chain -> Uuid,
        public_key -> Bytea,
        wrapped_private_key -> Bytea,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    hafen.audit_unsigned_chains (chain) {
        chain -> Uuid,
    }
}

diesel::table! {
    hafen.audit_signed_heads (chain, sequence) {
        chain -> Uuid,
        sequence -> BigInt,
        hash -> Bytea,
        signed_at -> Timestamptz,
        signature -> Bytea,
    }
}

diesel::table! {
    hafen.widget_routes (widget_id) {
        widget_id -> Uuid,
        tenant_id -> Uuid,
    }
}

diesel::table! {
    widgets (id) {
        id -> Uuid,
        enabled -> Bool,
        settings -> Jsonb,
        visit_lifetime_days -> Integer,
        create_request_id -> Nullable<Uuid>,
        created_by -> Uuid,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        identity_secret_sealed -> Nullable<Bytea>,
    }
}

diesel::table! {
    consent_texts (widget_id, version) {
        widget_id -> Uuid,
        version -> Integer,
        text -> Text,
        text_sha256 -> Bytea,
        created_at -> Timestamptz,
        language -> Text,
    }
}

diesel::table! {
    consent_text_translations (widget_id, version, language) {
        widget_id -> Uuid,
        version -> Integer,
        language -> Text,
        text -> Text,
        text_sha256 -> Bytea,
    }
}

diesel::table! {
    visits (id) {
        id -> Uuid,
        widget_id -> Uuid,
        token_sha256 -> Bytea,
        created_at -> Timestamptz,
        last_seen_at -> Timestamptz,
        expires_at -> Timestamptz,
        conversation_id -> Nullable<Uuid>,
        agent_id -> Nullable<Uuid>,
        identity_sha256 -> Nullable<Bytea>,
    }
}

diesel::table! {
    consent_records (id) {
        id -> Uuid,
        visit_id -> Uuid,
        version -> Integer,
        text_sha256 -> Bytea,
        granted -> Bool,
        decided_at -> Timestamptz,
        language -> Text,
    }
}

diesel::table! {
    visit_fields (visit_id, key) {
        visit_id -> Uuid,
        key -> Text,
        sealed -> Bytea,
        personal -> Bool,
        released_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
    }
}

diesel::joinable!(chat_codes -> users (user_id));
diesel::joinable!(members -> conversations (conversation_id));
diesel::joinable!(messages -> conversations (conversation_id));
diesel::allow_tables_to_appear_in_same_query!(
    users,
    chat_codes,
    conversations,
    members,
    messages,
    events,
    legal_holds,
    purge_runs,
    widgets,
    consent_texts,
    consent_text_translations,
    visits,
    consent_records,
    visit_fields
);

diesel::table! {
    hafen.backup_runs (id) {
        id -> Uuid,
        finished_at -> Timestamptz,
        tenants -> Int4,
        failed -> Int4,
        keep_days -> Int4,
    }
}

diesel::table! {
    hafen_keys.tenant_keys (tenant_id) {
        tenant_id -> Uuid,
        key_version -> Int4,
        wrapped_key -> Bytea,
        created_at -> Timestamptz,
        rewrapped_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    hafen_keys.user_keys (tenant_id, user_id) {
        tenant_id -> Uuid,
        user_id -> Uuid,
        wrapped_key -> Bytea,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    hafen_keys.deletion_log (id) {
        id -> Uuid,
        kind -> Text,
        tenant_id -> Uuid,
        user_id -> Nullable<Uuid>,
        deleted_at -> Timestamptz,
        message_id -> Nullable<Uuid>,
    }
}

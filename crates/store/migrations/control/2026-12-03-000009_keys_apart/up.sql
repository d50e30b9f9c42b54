-- Keys and the deletion log live in the key store (`hafen_keys`, its own database): a copy of
-- the control plane holds no key. `hafen-tenant migrate` moves their rows there before this
-- runs.
DROP TABLE user_keys;
DROP TABLE tenant_keys;
DROP TABLE deletion_log;

DROP TABLE deletion_log;
DROP TABLE user_keys;
DROP TABLE tenant_keys;

DROP TABLE deletion_log;
DROP TABLE tenant_keys;
DROP TABLE tenants;

DROP TABLE audit_unsigned_chains;
ALTER TABLE tenants DROP COLUMN audit_public_key;
DROP TABLE audit_signed_heads;
DROP TABLE audit_keys;

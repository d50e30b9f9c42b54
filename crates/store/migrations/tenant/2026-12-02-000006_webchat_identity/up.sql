-- Signed visitor identities (CB8): a site whose own users are logged in vouches for who the
-- visitor is, so the same person resumes one visit on every device.

-- The widget's identity secret, sealed under the widget's own data key (kept with the users'
-- keys under the widget's id, so it dies with the tenant's key); NULL: identities are ignored.
ALTER TABLE widgets ADD COLUMN identity_secret_sealed bytea;

-- The visitor's identity as a keyed hash (never the site's id itself); NULL for anonymous
-- visits. One live visit per identity and widget: an expired visit gives its identity up
-- before a new visit takes it.
ALTER TABLE visits ADD COLUMN identity_sha256 bytea CHECK (length(identity_sha256) = 32);
CREATE UNIQUE INDEX visits_identity_idx ON visits (widget_id, identity_sha256)
    WHERE identity_sha256 IS NOT NULL;

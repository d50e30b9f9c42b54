-- The website chat's part of the control plane.

-- Which tenant a widget belongs to. A widget's id is public (it is embedded in the tenant's
-- website) and visitors' calls name only it, so the webchat service finds the tenant here;
-- everything else about the widget lives in the tenant's schema.
CREATE TABLE widget_routes (
    widget_id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id)
);

CREATE INDEX widget_routes_tenant_idx ON widget_routes (tenant_id);

-- A visitor who deleted their data is in the deletion log like an erased user (`user_id` is
-- the visit's id, under which their key was kept), so a restore cannot bring the key back.
ALTER TABLE deletion_log
    DROP CONSTRAINT deletion_log_kind_check,
    DROP CONSTRAINT deletion_log_check,
    ADD CONSTRAINT deletion_log_kind_check CHECK (kind IN ('tenant', 'user', 'visitor')),
    ADD CONSTRAINT deletion_log_check CHECK ((kind IN ('user', 'visitor')) = (user_id IS NOT NULL));

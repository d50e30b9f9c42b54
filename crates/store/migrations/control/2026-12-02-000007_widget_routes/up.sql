-- Which tenant a website-chat widget belongs to. A widget's id is public (it is embedded in
-- the tenant's website) and visitors' calls name only it, so the webchat service finds the
-- tenant here; everything else about the widget lives in the tenant's schema.
CREATE TABLE widget_routes (
    widget_id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id)
);

CREATE INDEX widget_routes_tenant_idx ON widget_routes (tenant_id);

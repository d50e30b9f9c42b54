-- Users' own erasure requests (AuthService.RequestErasure) waiting out the organisation's
-- grace period: the auth service carries out those that are due. Ids and times only.
CREATE TABLE erasure_requests (
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    user_id      uuid NOT NULL,
    requested_at timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);

CREATE INDEX erasure_requests_due_idx ON erasure_requests (due_at);

-- What each running service instance reports about itself (GR7): how its links are secured
-- and which measures it carries out. The Art. 30 record states a technical measure only when
-- the reports of the running services show it in force, never from fixed text. An instance
-- reports at start and then every minute; reports older than a few minutes are not used.
CREATE TABLE service_facts (
    service     text NOT NULL,
    instance    uuid NOT NULL,
    reported_at timestamptz NOT NULL,
    facts       jsonb NOT NULL,
    PRIMARY KEY (service, instance)
);

CREATE INDEX service_facts_reported_idx ON service_facts (reported_at);

-- Signed chain heads (BX2), as Certificate Transparency signs tree heads: whoever can write
-- the audit tables can recompute the whole SHA-256 chain after editing an event, but cannot
-- sign its new head. Every append signs the chain's new head with the chain's own Ed25519
-- key; anyone verifies with the public key alone.

-- Each chain's signing key (the nil UUID for the platform chain): the private key (PKCS#8)
-- sealed with AES-256-GCM under the audit service's sub-key of the master key, the chain
-- id bound as associated data; the public key in the clear.
CREATE TABLE audit_keys (
    chain               uuid PRIMARY KEY,
    public_key          bytea NOT NULL CHECK (length(public_key) = 32),
    wrapped_private_key bytea NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per append: the chain's head after it, when it was signed, and the signature over
-- the text documented in hafen.audit.v1.VerifyChainResponse.
CREATE TABLE audit_signed_heads (
    chain     uuid NOT NULL,
    sequence  bigint NOT NULL CHECK (sequence > 0),
    hash      bytea NOT NULL,
    signed_at timestamptz NOT NULL,
    signature bytea NOT NULL CHECK (length(signature) = 64),
    PRIMARY KEY (chain, sequence)
);

-- The tenant record carries its chain's public key, so owners and auditors have it from a
-- source other than the export they verify.
ALTER TABLE tenants ADD COLUMN audit_public_key bytea;

-- Chains with events but no key yet: they get their key with their next append. Any other
-- chain gets a key only with its first event, so a chain whose key was removed is never
-- keyed anew (a new key would make a rewritten history look signed).
CREATE TABLE audit_unsigned_chains (
    chain uuid PRIMARY KEY
);
INSERT INTO audit_unsigned_chains SELECT DISTINCT chain FROM audit_events;

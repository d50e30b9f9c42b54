//! Hafen's gRPC contracts as Rust types: one module per protobuf package
//! (`hafen.<service>.v1`), generated at build time from `proto/` by `build.rs`, plus
//! [`FILE_DESCRIPTOR_SET`], the encoded descriptors every server registers with gRPC
//! reflection.
//!
//! This crate owns code generation and nothing else: no storage, no business logic.

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    reason = "generated code; its documentation comes from the .proto comments"
)]

/// Encoded `google.protobuf.FileDescriptorSet` of every Hafen `.proto` file and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hafen_descriptor.bin"));

/// Shared types (`hafen.common.v1`).
pub mod common {
    pub mod v1 {
        tonic::include_proto!("hafen.common.v1");
    }
}

/// Accounts, chat codes and sessions (`hafen.auth.v1`).
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("hafen.auth.v1");
    }
}

/// Conversations and messages (`hafen.messaging.v1`).
pub mod messaging {
    pub mod v1 {
        tonic::include_proto!("hafen.messaging.v1");
    }
}

/// Tenant provisioning (`hafen.tenant.v1`).
pub mod tenant {
    pub mod v1 {
        tonic::include_proto!("hafen.tenant.v1");
    }
}

/// Retention policies and purges (`hafen.retention.v1`).
pub mod retention {
    pub mod v1 {
        tonic::include_proto!("hafen.retention.v1");
    }
}

/// The tamper-evident audit trail (`hafen.audit.v1`).
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("hafen.audit.v1");
    }
}

/// The website chat: widgets and visitors (`hafen.webchat.v1`).
pub mod webchat {
    pub mod v1 {
        tonic::include_proto!("hafen.webchat.v1");
    }
}

//! End-to-end tests of Hafen live in `e2e/`: every service is started in-process on port 0
//! with TLS (see `hafen-testkit`) and driven through real gRPC clients. This library is empty;
//! it exists so the package has a target besides its tests.

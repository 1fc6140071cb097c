//! The CAS server as a library. The storage core and the HTTP layer arrive
//! with the server issue; for now this crate only pins the protocol it speaks.

pub use cas_protocol as protocol;

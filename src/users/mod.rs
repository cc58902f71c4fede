//! Users: the wire model shared with the older proxy, and the in-process cache.

pub mod cache;
pub mod fields;
pub mod model;
pub mod patch;
pub mod profile;
pub mod record;
mod table;

pub use cache::{
    Change, ChangeTicket, KeptAbsent, Reread, Settled, TakenChanges, UserCache, UserChange,
};
pub use fields::Fields;
pub use model::{FieldError, StoredUser, User, UserType};
pub use patch::{Patch, UserPatch};
pub use record::{Admission, IpAdmission, UserRecord};
pub use table::Lookup;

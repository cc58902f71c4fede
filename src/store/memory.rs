//! The memory store: nothing survives a restart, as with the older proxy's default. Writes are
//! acknowledged at once so the engine, tickets and admin responses behave as with any store.

use async_trait::async_trait;

use super::{ApplyReport, Batch, StoreBackend, StoreError};
use crate::users::{Change, User, UserCache};

#[derive(Debug, Default)]
pub struct MemoryStore;

#[async_trait]
impl StoreBackend for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn load_all(&self) -> Result<Vec<User>, StoreError> {
        Ok(Vec::new())
    }

    async fn apply(&self, _batch: &Batch) -> Result<ApplyReport, StoreError> {
        Ok(ApplyReport::default())
    }

    /// Nothing to restore: this store refuses nothing.
    async fn restore(&self, _cache: &UserCache, _refused: &[&Change]) -> Result<(), StoreError> {
        Ok(())
    }
}

//! Which fields of a user changed locally and still have to reach the store. One bit per
//! field lets the Firebase backend write leaves instead of whole users, and lets changes that
//! arrive from the store skip fields whose local edit has not been written yet.

/// A set of changed fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fields(pub u32);

macro_rules! fields {
    ($($name:ident = $bit:expr, $json:literal;)*) => {
        impl Fields {
            $(pub const $name: Fields = Fields(1 << $bit);)*

            /// `(bit, JSON field name)` for every per-field bit.
            pub const NAMED: &'static [(Fields, &'static str)] = &[$((Fields::$name, $json)),*];
        }
    };
}

fields! {
    IP = 0, "ip";
    NICKNAME = 1, "nickname";
    TYPE = 2, "type";
    PROMPT_COUNT = 3, "promptCount";
    TOKEN_COUNT = 4, "tokenCount";
    TOKEN_COUNTS = 5, "tokenCounts";
    TOKEN_LIMITS = 6, "tokenLimits";
    TOKEN_REFRESH = 7, "tokenRefresh";
    CREATED_AT = 8, "createdAt";
    LAST_USED_AT = 9, "lastUsedAt";
    DISABLED_AT = 10, "disabledAt";
    DISABLED_REASON = 11, "disabledReason";
    EXPIRES_AT = 12, "expiresAt";
    MAX_IPS = 13, "maxIps";
    ADMIN_NOTE = 14, "adminNote";
    META = 15, "meta";
}

impl Fields {
    pub const NONE: Fields = Fields(0);
    /// Every per-field bit.
    pub const ALL: Fields = Fields((1 << 16) - 1);
    /// The user is new (or re-created): write it whole.
    pub const CREATED: Fields = Fields(1 << 20);
    /// What stays "unconfirmed" until the store acknowledges it. `IP_REPLACED` too: while an
    /// admin's list is on its way, a store change keeps the local list whole.
    pub const TRACKED: Fields =
        Fields(Fields::ALL.0 | Fields::CREATED.0 | Fields::IP_REPLACED.0 | Fields::UPSERTED.0);
    /// `promptCount` grew by the change's delta (requests, not an admin edit).
    pub const PROMPT_DELTA: Fields = Fields(1 << 21);
    /// With `IP`: an admin replaced the `ip` list (write it as is), rather than requests
    /// adding addresses to it (merge them into the stored list).
    pub const IP_REPLACED: Fields = Fields(1 << 22);
    /// With `CREATED`: the user was created by an upsert of a token this instance did not
    /// know (not streamed yet, or skipped as unreadable), so the store may have it. It is
    /// created only if absent there; an existing one gets the upsert's fields (those marked)
    /// as leaves instead of being replaced. Without it, `CREATED` is a token that cannot
    /// exist (a fresh UUID, or one this instance removed and re-creates): written whole.
    pub const UPSERTED: Fields = Fields(1 << 23);

    #[inline]
    pub const fn union(self, other: Fields) -> Fields {
        Fields(self.0 | other.0)
    }

    #[inline]
    pub const fn contains(self, other: Fields) -> bool {
        self.0 & other.0 == other.0
    }

    #[inline]
    pub const fn intersects(self, other: Fields) -> bool {
        self.0 & other.0 != 0
    }

    #[inline]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// JSON names of the per-field bits set.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Fields::NAMED
            .iter()
            .filter(move |(f, _)| self.contains(*f))
            .map(|(_, n)| *n)
    }
}

impl std::ops::BitOr for Fields {
    type Output = Fields;
    fn bitor(self, rhs: Fields) -> Fields {
        self.union(rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_bits() {
        let f = Fields::IP | Fields::MAX_IPS | Fields::PROMPT_DELTA;
        assert_eq!(f.names().collect::<Vec<_>>(), vec!["ip", "maxIps"]);
        assert!(Fields::ALL.contains(Fields::META));
        assert!(!Fields::ALL.intersects(Fields::CREATED));
    }
}

//! `/admin/users`: the older proxy's REST contract (paths, User JSON, `{"users":[…]}` shapes,
//! 200 on success), with strict validation and writes that report whether they are durable.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::http::{json_response, parse_json, query_params, ApiError, JsonObject};
use crate::clock::now_ms;
use crate::store::StoreStatus;
use crate::users::cache::CacheError;
use crate::users::model::{validate_families, validate_token, FamilyValues};
use crate::users::{ChangeTicket, Patch, User, UserCache, UserPatch, UserType};

pub type Reply = http::Response<Vec<u8>>;

/// A field `GET /admin/users?sort=` orders by: descending, missing values last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SortField {
    Token,
    Nickname,
    Type,
    PromptCount,
    CreatedAt,
    LastUsedAt,
    DisabledAt,
    ExpiresAt,
    MaxIps,
    /// The number of addresses.
    Ip,
    /// The sum of `tokenCounts`.
    SumTokens,
}

impl SortField {
    /// Every field with its name in `sort=`, in the order the refusal lists them.
    const ALL: [(&'static str, SortField); 11] = [
        ("token", Self::Token),
        ("nickname", Self::Nickname),
        ("type", Self::Type),
        ("promptCount", Self::PromptCount),
        ("createdAt", Self::CreatedAt),
        ("lastUsedAt", Self::LastUsedAt),
        ("disabledAt", Self::DisabledAt),
        ("expiresAt", Self::ExpiresAt),
        ("maxIps", Self::MaxIps),
        ("ip", Self::Ip),
        ("sumTokens", Self::SumTokens),
    ];

    fn parse(name: &str) -> Result<Self, ApiError> {
        Self::ALL
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, field)| *field)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(known, _)| *known).collect();
                ApiError::bad_request(
                    "sort",
                    format!(
                        "cannot sort by '{name}'; sortable fields: {}",
                        names.join(", ")
                    ),
                )
            })
    }

    /// Descending, with missing values last.
    fn compare(self, a: &User, b: &User) -> Ordering {
        fn opt<T: Ord>(a: Option<T>, b: Option<T>) -> Ordering {
            match (a, b) {
                (Some(a), Some(b)) => b.cmp(&a),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            }
        }
        let sum = |u: &User| u.token_counts.values().map(|v| v.0).sum::<f64>();
        match self {
            Self::Token => b.token.cmp(&a.token),
            Self::Nickname => opt(a.nickname.as_ref(), b.nickname.as_ref()),
            Self::Type => b.user_type.as_str().cmp(a.user_type.as_str()),
            Self::PromptCount => b.prompt_count.cmp(&a.prompt_count),
            Self::CreatedAt => b.created_at.cmp(&a.created_at),
            Self::LastUsedAt => opt(a.last_used_at, b.last_used_at),
            Self::DisabledAt => opt(a.disabled_at, b.disabled_at),
            Self::ExpiresAt => opt(a.expires_at, b.expires_at),
            Self::MaxIps => opt(a.max_ips, b.max_ips),
            Self::Ip => b.ip.len().cmp(&a.ip.len()),
            Self::SumTokens => sum(b).total_cmp(&sum(a)),
        }
    }
}

const DEFAULT_SORT: &str = "promptCount,lastUsedAt";

pub struct UsersApi {
    cache: Arc<UserCache>,
    status: Arc<StoreStatus>,
    persist_timeout: Duration,
    /// Held by an import or a full list from start to reply: one at a time, as when they ran on
    /// the admin thread itself, so that concurrent ones neither interleave their users nor hold
    /// several copies of every user in memory.
    bulk: tokio::sync::Mutex<()>,
}

#[derive(Serialize)]
struct UserList<'a> {
    users: &'a [User],
    count: usize,
}

#[derive(Serialize)]
struct Upserted<'a> {
    upserted_users: &'a [User],
    count: usize,
}

#[derive(Serialize)]
struct Created<'a> {
    token: &'a str,
}

/// The body of `POST /admin/users` (public for the fuzz targets, which parse it as the API does).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(rename = "type", default)]
    user_type: UserType,
    #[serde(default, deserialize_with = "crate::users::patch::js_integer_option")]
    expires_at: Option<u64>,
    #[serde(default)]
    token_limits: Option<FamilyValues>,
}

/// The body of `PUT /admin/users` (public for the fuzz targets).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    pub users: Vec<JsonObject<UserPatch>>,
    /// Present in `GET /admin/users` exports; accepted so an export imports as it is.
    #[serde(default)]
    #[allow(dead_code)]
    count: Option<u64>,
}

impl UsersApi {
    pub fn new(cache: Arc<UserCache>, status: Arc<StoreStatus>, persist_timeout: Duration) -> Self {
        Self {
            cache,
            status,
            persist_timeout,
            bulk: tokio::sync::Mutex::new(()),
        }
    }

    /// The cache this API edits.
    pub fn cache(&self) -> &UserCache {
        &self.cache
    }

    /// `GET /admin/users?sort=f1,f2`: every user, sorted descending, missing values last.
    pub async fn list(&self, query: Option<&str>) -> Result<Reply, ApiError> {
        let mut sort: Option<String> = None;
        for (key, value) in query_params(query) {
            match key.as_str() {
                // The older proxy failed (500) on a repeated `sort`; neither one is assumed.
                "sort" if sort.is_some() => {
                    return Err(ApiError::bad_request(
                        "sort",
                        "must be given at most once (list several fields as sort=f1,f2)",
                    ))
                }
                "sort" => sort = Some(value),
                other => {
                    return Err(ApiError::bad_request(
                        other,
                        "unknown query parameter (only 'sort' is accepted)",
                    ))
                }
            }
        }
        let sort = sort.unwrap_or_else(|| DEFAULT_SORT.to_string());
        let fields = sort_fields(&sort)
            .into_iter()
            .map(SortField::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let _bulk = self.bulk.lock().await;
        let cache = Arc::clone(&self.cache);
        off_thread(move || {
            let mut users = cache.snapshot();
            users.sort_by(|a, b| {
                fields
                    .iter()
                    .map(|f| f.compare(a, b))
                    .find(|o| o.is_ne())
                    .unwrap_or(Ordering::Equal)
            });
            json_response(
                200,
                &UserList {
                    users: &users,
                    count: users.len(),
                },
                &[],
            )
        })
        .await
    }

    /// `GET /admin/users/{token}`.
    pub fn get(&self, token: &str) -> Result<Reply, ApiError> {
        let user = self
            .cache
            .user(token)
            .ok_or_else(|| ApiError::not_found("Not found"))?;
        Ok(json_response(200, &user, &[]))
    }

    /// `POST /admin/users`: a new normal, special or temporary user with a random token.
    pub async fn create(&self, body: &[u8]) -> Result<Reply, ApiError> {
        let request: CreateRequest = if body.iter().all(u8::is_ascii_whitespace) {
            CreateRequest::default()
        } else {
            parse_json(body)?
        };
        match (request.user_type, request.expires_at) {
            (UserType::Temporary, None) => {
                return Err(ApiError::bad_request(
                    "expiresAt",
                    "is required for temporary users (epoch ms)",
                ))
            }
            (UserType::Normal | UserType::Special, Some(_)) => {
                return Err(ApiError::bad_request(
                    "expiresAt",
                    "only temporary users expire",
                ))
            }
            _ => {}
        }
        let now = now_ms();
        let mut user = User::new(uuid::Uuid::new_v4().to_string(), request.user_type, now);
        user.expires_at = request.expires_at;
        // As in the older proxy, only temporary users take `tokenLimits` at creation; for
        // normal and special users the key is stripped (set limits afterwards with PUT).
        if let (UserType::Temporary, Some(limits)) = (request.user_type, request.token_limits) {
            validate_families(&limits, "", "tokenLimits")
                .map_err(|e| ApiError::bad_request(e.field, e.problem))?;
            user.token_limits = limits;
        }
        user.validate("")
            .map_err(|e| ApiError::bad_request(e.field, e.problem))?;
        let ticket = self
            .cache
            .create(&user)
            .map_err(|_| ApiError::new(500, "internal_error", "token collision; try again"))?;
        self.respond_when_durable(
            ticket,
            [user.token.as_str()],
            &Created { token: &user.token },
        )
        .await
    }

    /// `PUT /admin/users/{token}`: partial upsert; `null` removes an optional field. An empty
    /// body is `{}`, as the older proxy's body parser read it: the user is created if missing.
    pub async fn upsert(&self, token: &str, body: &[u8]) -> Result<Reply, ApiError> {
        validate_token(token).map_err(|p| ApiError::bad_request("token", p))?;
        let patch: UserPatch = if body.iter().all(u8::is_ascii_whitespace) {
            UserPatch::default()
        } else {
            parse_json(body)?
        };
        if let Patch::Set(body_token) = &patch.token {
            if body_token != token {
                return Err(ApiError::bad_request(
                    "token",
                    "differs from the token in the path",
                ));
            }
        }
        patch
            .validate("")
            .map_err(|e| ApiError::bad_request(e.field, e.problem))?;
        let (user, ticket) = self.cache.upsert(token, &patch, now_ms());
        self.respond_when_durable(ticket, [token], &user).await
    }

    /// `PUT /admin/users`: the import. All entries are validated before any is applied.
    pub async fn upsert_many(&self, body: Vec<u8>) -> Result<Reply, ApiError> {
        let _bulk = self.bulk.lock().await;
        let cache = Arc::clone(&self.cache);
        let (users, ticket) = off_thread(move || {
            let request: BulkRequest = parse_json(&body)?;
            let mut items = Vec::with_capacity(request.users.len());
            for (i, JsonObject(mut patch)) in request.users.into_iter().enumerate() {
                let at = format!("users[{i}]");
                let Patch::Set(token) = std::mem::take(&mut patch.token) else {
                    return Err(ApiError::bad_request(format!("{at}.token"), "is required"));
                };
                validate_token(&token)
                    .map_err(|p| ApiError::bad_request(format!("{at}.token"), p))?;
                patch
                    .validate(&at)
                    .map_err(|e| ApiError::bad_request(e.field, e.problem))?;
                items.push((token, patch));
            }
            Ok(cache.upsert_many(&items, now_ms()))
        })
        .await??;
        let (status, persisted) = self
            .durability(ticket, users.iter().map(|u| u.token.as_str()))
            .await?;
        off_thread(move || {
            json_response(
                status,
                &Upserted {
                    upserted_users: &users,
                    count: users.len(),
                },
                &[("x-tollgate-persisted", persisted)],
            )
        })
        .await
    }

    /// `DELETE /admin/users/{token}[?disabledReason=…][&hard=true]`.
    pub async fn delete(&self, token: &str, query: Option<&str>) -> Result<Reply, ApiError> {
        let mut reason: Option<String> = None;
        let mut hard: Option<bool> = None;
        for (key, value) in query_params(query) {
            match key.as_str() {
                "disabledReason" if reason.is_some() => {
                    return Err(ApiError::bad_request(
                        "disabledReason",
                        "must be given at most once",
                    ))
                }
                "disabledReason" => reason = Some(value),
                // Given twice, a removal could hinge on which one wins: refused, as a
                // repeated `disabledReason` is.
                "hard" if hard.is_some() => {
                    return Err(ApiError::bad_request("hard", "must be given at most once"))
                }
                "hard" => {
                    hard = Some(match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(ApiError::bad_request(
                                "hard",
                                "must be true, false, 1 or 0",
                            ))
                        }
                    })
                }
                other => {
                    return Err(ApiError::bad_request(
                        other,
                        "unknown query parameter (accepted: disabledReason, hard)",
                    ))
                }
            }
        }
        if hard == Some(true) {
            if reason.is_some() {
                // A reason is kept on a disabled user; a removed one keeps nothing.
                return Err(ApiError::bad_request(
                    "disabledReason",
                    "not used with hard=true (the user is removed, not disabled)",
                ));
            }
            let ticket = self
                .cache
                .remove(token)
                .map_err(|_| ApiError::not_found("Not found"))?;
            #[derive(Serialize)]
            struct Deleted<'a> {
                deleted: &'a str,
            }
            return self
                .respond_when_durable(ticket, [token], &Deleted { deleted: token })
                .await;
        }
        let (user, ticket) = self
            .cache
            .disable(token, reason.as_deref(), now_ms())
            .map_err(|e| match e {
                CacheError::NotFound | CacheError::Exists | CacheError::Changed => {
                    ApiError::not_found("Not found")
                }
            })?;
        self.respond_when_durable(ticket, [token], &user).await
    }

    /// `body` as 200 once the store confirmed the change; as 202 when it could not within the
    /// bound (the change is applied here and stays queued). `x-tollgate-persisted` says which.
    /// A 500 when the store refused the change of one of `tokens` for good: it is not saved.
    async fn respond_when_durable<'a, T: Serialize>(
        &self,
        ticket: ChangeTicket,
        tokens: impl IntoIterator<Item = &'a str>,
        body: &T,
    ) -> Result<Reply, ApiError> {
        let (status, persisted) = self.durability(ticket, tokens).await?;
        Ok(json_response(
            status,
            body,
            &[("x-tollgate-persisted", persisted)],
        ))
    }

    /// The status and `x-tollgate-persisted` value of `respond_when_durable`, or its 500.
    async fn durability<'a>(
        &self,
        ticket: ChangeTicket,
        tokens: impl IntoIterator<Item = &'a str>,
    ) -> Result<(u16, &'static str), ApiError> {
        let tokens: Vec<&str> = tokens.into_iter().collect();
        let durable = self
            .status
            .wait_written(ticket, &tokens, self.persist_timeout)
            .await;
        let refusals = self.status.refusals_since(ticket);
        if !refusals.is_empty() {
            let refused: HashMap<&str, &str> = refusals
                .iter()
                .map(|(token, reason)| (token.as_ref(), reason.as_str()))
                .collect();
            let mut ours = tokens
                .into_iter()
                .filter_map(|t| refused.get(t).map(|r| (t, *r)));
            if let Some((token, reason)) = ours.next() {
                let others = ours.count();
                let more = if others > 0 {
                    format!(" (and {others} more users' changes)")
                } else {
                    String::new()
                };
                return Err(ApiError::new(
                    500,
                    "store_refused",
                    format!(
                        "the store refused the change to user {token}{more} and it is not saved: \
                         {reason}; this instance goes back to the stored value of the user as soon \
                         as it can read it"
                    ),
                )
                .with_header("x-tollgate-persisted", "false"));
            }
        }
        Ok(if durable {
            (200, "true")
        } else {
            (202, "false")
        })
    }
}

/// Runs `work` on tokio's blocking pool. Listing or importing a million users is seconds of
/// CPU, and the admin listener's single thread must keep answering `/health`, `/ready` (probes
/// that time out get the process restarted), `/metrics` and other admin requests meanwhile.
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|_| {
        ApiError::new(
            500,
            "internal_error",
            "the request failed while being processed; see the log",
        )
    })
}

/// The fields of a `sort=` value; an empty value (`sort=`, `sort=,`) means the default sort,
/// as if the parameter were absent.
fn sort_fields(sort: &str) -> Vec<&str> {
    let fields: Vec<&str> = sort
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    if fields.is_empty() {
        DEFAULT_SORT.split(',').collect()
    } else {
        fields
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::model::JsNumber;

    fn user(token: &str, prompts: u64, last: Option<u64>) -> User {
        let mut u = User::new(token.into(), UserType::Normal, 1);
        u.prompt_count = prompts;
        u.last_used_at = last;
        u
    }

    #[test]
    fn empty_sort_means_the_default() {
        for empty in ["", ",", " , "] {
            assert_eq!(
                sort_fields(empty),
                vec!["promptCount", "lastUsedAt"],
                "{empty:?}"
            );
        }
        assert_eq!(sort_fields("ip,,token"), vec!["ip", "token"]);
    }

    #[test]
    fn every_sortable_field_parses_and_orders() {
        let low = user("a", 1, Some(1));
        let mut high = user("b", 2, Some(2));
        high.nickname = Some("n".into());
        high.user_type = UserType::Temporary;
        high.created_at = 2;
        high.disabled_at = Some(2);
        high.expires_at = Some(2);
        high.max_ips = Some(2);
        high.ip = vec!["1.1.1.1".into()];
        high.token_counts.insert("gpt".into(), JsNumber(2.0));
        for (name, field) in SortField::ALL {
            assert_eq!(SortField::parse(name), Ok(field));
            assert_eq!(field.compare(&high, &low), Ordering::Less, "{name}");
            assert_eq!(field.compare(&low, &high), Ordering::Greater, "{name}");
        }
        let refused = SortField::parse("secret").unwrap_err();
        assert_eq!(refused.field.as_deref(), Some("sort"));
        assert!(refused.message.ends_with("token, nickname, type, promptCount, createdAt, lastUsedAt, disabledAt, expiresAt, maxIps, ip, sumTokens"), "{}", refused.message);
    }

    #[test]
    fn sort_is_descending_with_missing_last() {
        let mut users = [
            user("a", 1, None),
            user("b", 5, Some(1)),
            user("c", 1, Some(9)),
        ];
        users.sort_by(|a, b| {
            [SortField::PromptCount, SortField::LastUsedAt]
                .iter()
                .map(|f| f.compare(a, b))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        });
        let order: Vec<&str> = users.iter().map(|u| u.token.as_str()).collect();
        assert_eq!(order, vec!["b", "c", "a"]);
    }
}

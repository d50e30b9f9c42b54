//! Raw SQL that each connection prepares once and then reuses.
//!
//! diesel never caches `sql_query` statements: each run first prepares an unnamed statement,
//! a round trip of its own, and diesel-async holds the connection's statement cache while it
//! does, so pipelined raw statements are prepared one after another. A [`Prepared`] statement
//! is cached by its text, as diesel's own queries are: after its first use it costs no extra
//! round trip and pipelines freely.
//!
//! Only for statements whose plan does not depend on their parameters: PostgreSQL may switch a
//! cached statement to a generic plan after a few runs ([`INDEX_PROBES_ONLY`] keeps such plans
//! right for lookups by key). Prepared statements follow the connection's `search_path`
//! (PostgreSQL re-parses them when it changed), so a tenant scope entered on a pooled
//! connection applies to them too.
//!
//! A [`Statement`] is the same for a statement written out whole, as in a `.sql` file, with
//! its parameters numbered (`$1`, `$2`, a number used as often as needed) and bound in that
//! order.
//!
//! ```
//! use diesel::sql_types::Text;
//! use hafen_store::prepared::{Prepared, Statement, bind};
//!
//! let statement = Statement::new(
//!     "SELECT set_config('role', $1, true), set_config('search_path', $1, true)",
//!     (bind::<Text, _>("t_0"),),
//! );
//! # let _ = statement;
//!
//! // `$1` and `$2` go where the parts meet: SELECT set_config('role', $1, true), …
//! let statement = Prepared::new(
//!     &["SELECT set_config('role', ", ", true), set_config('search_path', ", ", true)"],
//!     (bind::<Text, _>("t_0"), bind::<Text, _>("t_0")),
//! );
//! # let _ = statement;
//! ```

use std::marker::PhantomData;

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};

/// The planner settings of [`INDEX_PROBES_ONLY`], for the transaction (`is_local` `true`) or
/// the session (`false`).
macro_rules! index_probes_only {
    ($is_local:literal) => {
        &[concat!(
            "SELECT set_config('enable_seqscan', 'off', ",
            $is_local,
            "), set_config('jit', 'off', ",
            $is_local,
            "), set_config('plan_cache_mode', 'force_generic_plan', ",
            $is_local,
            ")"
        )]
    };
}

/// Plans that stay right as a tenant grows, for the rest of the transaction. A statement
/// prepared once per connection may run with a generic plan made while its tables were
/// nearly empty: then a sequential scan, or a join that walks a whole index, looks as cheap as
/// a lookup, and stays in the plan as the tables grow. With sequential scans off, a lookup
/// written so that its key comes from outside the scan (`= ANY (…)`, a correlated or a
/// `LATERAL (… LIMIT 1)` subquery) can only be an index probe. A plain join can still walk a
/// whole index: write lookups in those forms. JIT is off too: an unavoidable sequential scan
/// (a one-row table) then looks costly enough to the planner to compile the statement,
/// hundreds of milliseconds for a millisecond's work. And since such a plan is right for any
/// parameters, it is made once: `plan_cache_mode` is `force_generic_plan` (left to itself,
/// PostgreSQL would plan small batches anew each time, half a millisecond per run). Run it,
/// pipelined, before such statements.
pub const INDEX_PROBES_ONLY: &[&str] = index_probes_only!("true");

/// [`INDEX_PROBES_ONLY`] for the rest of the session, on a connection whose every statement
/// is written for it (the messaging committer's); the pool resets it when the connection
/// comes back.
pub const INDEX_PROBES_ONLY_FOR_SESSION: &[&str] = index_probes_only!("false");

/// A statement of fixed text with its parameters; see the module documentation.
#[derive(Debug, Clone)]
pub struct Prepared<B> {
    parts: &'static [&'static str],
    binds: B,
}

impl<B: Binds> Prepared<B> {
    /// The statement whose text is `parts` with a parameter (`$1`, `$2`, …) between each two
    /// of them, bound to `binds` in order: one part more than there are binds.
    pub fn new(parts: &'static [&'static str], binds: B) -> Self {
        debug_assert_eq!(parts.len(), B::COUNT + 1, "one part more than binds");
        Self { parts, binds }
    }
}

impl Prepared<()> {
    /// A statement without parameters (`BEGIN`, `COMMIT`, a `LOCK`).
    pub fn text(sql: &'static [&'static str]) -> Self {
        Self::new(sql, ())
    }
}

/// One parameter of SQL type `ST`.
#[derive(Debug, Clone)]
pub struct Bind<ST, U> {
    value: U,
    sql_type: PhantomData<ST>,
}

/// The parameter `value`, of SQL type `ST`.
pub fn bind<ST, U>(value: U) -> Bind<ST, U> {
    Bind {
        value,
        sql_type: PhantomData,
    }
}

/// The parameters of a [`Prepared`] statement: none, or a tuple of [`Bind`]s.
pub trait Binds {
    /// How many there are.
    const COUNT: usize;

    /// The parameter at `index` (from 0).
    fn get(&self, index: usize) -> Option<&dyn BindOne>;

    /// Writes `parts` with the parameters between them.
    fn walk<'b>(
        &'b self,
        parts: &'static [&'static str],
        out: &mut AstPass<'_, 'b, Pg>,
    ) -> QueryResult<()>;
}

/// One parameter, written as `$n`.
pub trait BindOne {
    /// Writes the placeholder and collects the value.
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>;
}

impl<ST, U> BindOne for Bind<ST, U>
where
    Pg: HasSqlType<ST>,
    U: ToSql<ST, Pg>,
{
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, U>(&self.value)
    }
}

impl Binds for () {
    const COUNT: usize = 0;

    fn get(&self, _index: usize) -> Option<&dyn BindOne> {
        None
    }

    fn walk<'b>(
        &'b self,
        parts: &'static [&'static str],
        out: &mut AstPass<'_, 'b, Pg>,
    ) -> QueryResult<()> {
        parts.iter().for_each(|part| out.push_sql(part));
        Ok(())
    }
}

macro_rules! binds {
    ($count:literal: $($name:ident . $index:tt),+) => {
        impl<$($name: BindOne),+> Binds for ($($name,)+) {
            const COUNT: usize = $count;

            fn get(&self, index: usize) -> Option<&dyn BindOne> {
                match index {
                    $($index => Some(&self.$index),)+
                    _ => None,
                }
            }

            fn walk<'b>(
                &'b self,
                parts: &'static [&'static str],
                out: &mut AstPass<'_, 'b, Pg>,
            ) -> QueryResult<()> {
                let mut parts = parts.iter();
                if let Some(first) = parts.next() {
                    out.push_sql(first);
                }
                $(
                    self.$index.push(out)?;
                    if let Some(part) = parts.next() {
                        out.push_sql(part);
                    }
                )+
                Ok(())
            }
        }
    };
}

binds!(1: A.0);
binds!(2: A.0, B.1);
binds!(3: A.0, B.1, C.2);
binds!(4: A.0, B.1, C.2, D.3);
binds!(5: A.0, B.1, C.2, D.3, E.4);
binds!(6: A.0, B.1, C.2, D.3, E.4, F.5);
binds!(7: A.0, B.1, C.2, D.3, E.4, F.5, G.6);
binds!(8: A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7);
binds!(9: A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7, I.8);
binds!(10: A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7, I.8, J.9);
binds!(11: A.0, B.1, C.2, D.3, E.4, F.5, G.6, H.7, I.8, J.9, K.10);

impl<B: Binds> QueryFragment<Pg> for Prepared<B> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.binds.walk(self.parts, &mut out)
    }
}

/// No static id: diesel caches the statement by its text (and parameter types).
impl<B> QueryId for Prepared<B> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

/// Rows come back by column name (`QueryableByName`), as from `sql_query`.
impl<B: Binds> Query for Prepared<B> {
    type SqlType = Untyped;
}

/// A statement of fixed text with numbered parameters (`$1`, …, each number as often as
/// needed), bound to `binds` in order; see the module documentation. Every `$` followed by
/// digits is a parameter, wherever it stands: no dollar quoting, and no such text in comments.
/// diesel numbers the parameters it sends by their places, so the text PostgreSQL prepares
/// has one parameter per place, each with its number's value.
#[derive(Debug, Clone)]
pub struct Statement<B> {
    sql: &'static str,
    binds: B,
}

impl<B: Binds> Statement<B> {
    /// The statement `sql` with `binds` for `$1`, `$2`, ….
    pub fn new(sql: &'static str, binds: B) -> Self {
        Self { sql, binds }
    }
}

impl<B: Binds> QueryFragment<Pg> for Statement<B> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let mut rest = self.sql;
        while let Some(at) = rest.find('$') {
            let after = &rest[at + 1..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                out.push_sql(&rest[..=at]);
                rest = after;
                continue;
            }
            out.push_sql(&rest[..at]);
            let number: usize = after[..digits].parse().unwrap_or_default();
            let bind = number
                .checked_sub(1)
                .and_then(|index| self.binds.get(index))
                .ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!("parameter ${number} has no value").into(),
                    )
                })?;
            bind.push(&mut out)?;
            rest = &after[digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

/// No static id: diesel caches the statement by its text (and parameter types).
impl<B> QueryId for Statement<B> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<B: Binds> Query for Statement<B> {
    type SqlType = Untyped;
}

impl<B, Conn> diesel::RunQueryDsl<Conn> for Statement<B> {}

/// Runs on blocking connections too (migrations).
impl<B, Conn> diesel::RunQueryDsl<Conn> for Prepared<B> {}

#[cfg(test)]
mod tests {
    use diesel::sql_types::{BigInt, Text};

    use super::*;

    fn sql<B: Binds>(statement: &Prepared<B>) -> String {
        diesel::debug_query::<Pg, _>(statement)
            .to_string()
            .split(" -- binds")
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn parameters_are_numbered_between_the_parts() {
        let statement = Prepared::new(
            &["SELECT ", " + ", " AS n, ", "::text"],
            (
                bind::<BigInt, _>(1_i64),
                bind::<BigInt, _>(2_i64),
                bind::<Text, _>("x"),
            ),
        );
        assert_eq!(sql(&statement), "SELECT $1 + $2 AS n, $3::text");
        assert_eq!(sql(&Prepared::text(&["COMMIT"])), "COMMIT");
    }

    #[test]
    fn a_statement_binds_each_parameter_where_it_stands() {
        let statement = Statement::new(
            "SELECT $2 + $1 AS n, $2::text, '$' AS d",
            (bind::<BigInt, _>(1_i64), bind::<BigInt, _>(2_i64)),
        );
        let shown = diesel::debug_query::<Pg, _>(&statement).to_string();
        assert_eq!(
            shown,
            "SELECT $1 + $2 AS n, $3::text, '$' AS d -- binds: [2, 1, 2]"
        );
        assert!(
            QueryFragment::<Pg>::is_safe_to_cache_prepared(&statement, &Pg).unwrap_or_default()
        );
        let missing = Statement::new("SELECT $3", (bind::<BigInt, _>(1_i64),));
        let mut sql = diesel::pg::PgQueryBuilder::default();
        assert!(QueryFragment::<Pg>::to_sql(&missing, &mut sql, &Pg).is_err());
    }

    #[test]
    fn statements_are_safe_to_cache() {
        let statement = Prepared::new(&["SELECT ", ""], (bind::<BigInt, _>(1_i64),));
        assert!(
            QueryFragment::<Pg>::is_safe_to_cache_prepared(&statement, &Pg).unwrap_or_default()
        );
        assert!(
            !QueryFragment::<Pg>::is_safe_to_cache_prepared(&diesel::sql_query("SELECT 1"), &Pg)
                .unwrap_or(true)
        );
    }
}

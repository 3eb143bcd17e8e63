//! A batch's credits to `main.balance`, summed per account in Rust before they are sent,
//! so that pg_end aggregates a row or so per account instead of every record again.
//!
//! Invariant: PostgreSQL's `sum(amount)` and `max(created_at)` over the credits of an
//! account equal the same aggregates over the account's records, value and display scale
//! alike. A partial sum is exact integer arithmetic on the amounts scaled to the largest
//! display scale among them, which is also the scale `sum(numeric)` gives its result, and
//! it carries the latest `created_at` of the records in it. An amount that does not fit
//! that arithmetic (128 bits, 38 digits; no money comes near) is not approximated: it
//! is a credit of its own, as written, and PostgreSQL adds it to the rest.

use std::collections::BTreeMap;

use super::binary;
use super::validate::{Amount, Timestamp};

/// One row of the credit statement: an account, an amount to add, the latest time.
#[derive(Debug, Clone, Copy)]
pub struct Credit<'a> {
    pub account_id: i64,
    pub amount: binary::Numeric<'a>,
    pub created_at: Timestamp,
}

/// An account's running sum: `value × 10^-scale`.
#[derive(Debug, Clone, Copy)]
struct Sum {
    value: i128,
    scale: u16,
    latest: Timestamp,
}

impl Sum {
    /// Adds `amount` (of display scale `scale`, already × 10^scale in `value`), or gives
    /// `None`, unchanged, if the result would not fit.
    fn add(&mut self, value: i128, scale: u16, at: Timestamp) -> Option<()> {
        let common = self.scale.max(scale);
        let ours = rescale(self.value, common - self.scale)?;
        let theirs = rescale(value, common - scale)?;
        *self = Sum {
            value: ours.checked_add(theirs)?,
            scale: common,
            latest: self.latest.max(at),
        };
        Some(())
    }
}

fn rescale(value: i128, by: u16) -> Option<i128> {
    value.checked_mul(10i128.checked_pow(u32::from(by))?)
}

/// `amount × 10^dscale` as an integer, and `dscale`, the display scale `numeric_in`
/// gives it; `None` if it does not fit 128 bits.
fn scaled(amount: &Amount<'_>) -> Option<(i128, u16)> {
    let dscale = amount.display_scale();
    // digits × 10^(exponent - frac) × 10^dscale = digits × 10^max(exponent - frac, 0).
    let shift =
        u16::try_from((i64::from(amount.exponent) - amount.frac_digits.len() as i64).max(0))
            .ok()?;
    let mut value: i128 = 0;
    for d in amount.int_digits.bytes().chain(amount.frac_digits.bytes()) {
        value = value.checked_mul(10)?.checked_add(i128::from(d - b'0'))?;
    }
    let value = rescale(value, shift)?;
    Some((if amount.negative { -value } else { value }, dscale))
}

/// Adds `amount` to `account_id`'s partial sum in `sums`; `false` (nothing added) if it
/// is beyond the partial sums' reach.
fn sum_into(
    sums: &mut BTreeMap<i64, Sum>,
    account_id: i64,
    amount: &Amount<'_>,
    at: Timestamp,
) -> bool {
    scaled(amount)
        .and_then(|(value, scale)| match sums.get_mut(&account_id) {
            Some(sum) => sum.add(value, scale, at),
            None => {
                sums.insert(
                    account_id,
                    Sum {
                        value,
                        scale,
                        latest: at,
                    },
                );
                Some(())
            }
        })
        .is_some()
}

/// The partial sums as credits, in account order.
fn summed<'a, 's>(sums: &'s BTreeMap<i64, Sum>) -> impl Iterator<Item = Credit<'a>> + 's {
    sums.iter().map(|(&account_id, sum)| Credit {
        account_id,
        amount: binary::Numeric::Scaled {
            value: sum.value,
            scale: sum.scale,
        },
        created_at: sum.latest,
    })
}

/// The credits for `rows` (account, amount, created_at): one partial sum per account,
/// then a credit of its own for each amount beyond the partial sums' reach (the
/// statement aggregates per account and upserts in account order).
pub fn credits<'a>(rows: impl Iterator<Item = (i64, Amount<'a>, Timestamp)>) -> Vec<Credit<'a>> {
    let mut sums: BTreeMap<i64, Sum> = BTreeMap::new();
    let mut apart = Vec::new();
    for (account_id, amount, at) in rows {
        if !sum_into(&mut sums, account_id, &amount, at) {
            apart.push(Credit {
                account_id,
                amount: binary::Numeric::Written(amount),
                created_at: at,
            });
        }
    }
    summed(&sums).chain(apart).collect()
}

/// Credits gathered over several batches and sent once: a spilled transaction's parts
/// ([`super::OpenApply`]). Sent per part, they would update each account's balance row
/// once per part in one pg_end transaction, and every such update leaves a row version
/// that the next one must step over until the commit (quadratic in the parts). Memory:
/// one partial sum per account, and the rare amounts beyond its reach as written.
#[derive(Debug, Default, Clone)]
pub struct Deferred {
    sums: BTreeMap<i64, Sum>,
    /// (account, negative, integer digits, fraction digits, exponent, created_at).
    apart: Vec<(i64, bool, String, String, i32, Timestamp)>,
}

impl Deferred {
    pub fn add<'a>(&mut self, rows: impl Iterator<Item = (i64, Amount<'a>, Timestamp)>) {
        for (account_id, amount, at) in rows {
            if !sum_into(&mut self.sums, account_id, &amount, at) {
                self.apart.push((
                    account_id,
                    amount.negative,
                    amount.int_digits.to_string(),
                    amount.frac_digits.to_string(),
                    amount.exponent,
                    at,
                ));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sums.is_empty() && self.apart.is_empty()
    }

    /// Everything added, as [`credits`] would give it for all the rows at once.
    pub fn credits(&self) -> Vec<Credit<'_>> {
        let apart = self.apart.iter().map(
            |(account_id, negative, int_digits, frac_digits, exponent, at)| Credit {
                account_id: *account_id,
                amount: binary::Numeric::Written(Amount {
                    negative: *negative,
                    int_digits,
                    frac_digits,
                    exponent: *exponent,
                }),
                created_at: *at,
            },
        );
        summed(&self.sums).chain(apart).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::validate::parse_amount;

    fn sums(rows: &[(i64, &str)]) -> Vec<(i64, String)> {
        let rows: Vec<_> = rows
            .iter()
            .map(|(account, text)| (*account, parse_amount(text).unwrap(), Timestamp(0)))
            .collect();
        credits(rows.into_iter())
            .into_iter()
            .map(|c| (c.account_id, format!("{:?}", c.amount)))
            .collect()
    }

    #[test]
    fn amounts_are_summed_per_account_at_the_largest_scale() {
        let scaled =
            |value: i128, scale: u16| format!("{:?}", binary::Numeric::Scaled { value, scale });
        assert_eq!(
            sums(&[
                (2, "1.50"),
                (1, "10"),
                (2, "-0.125"),
                (1, "1e2"),
                (2, "2.5e-1")
            ]),
            vec![(1, scaled(110, 0)), (2, scaled(1625, 3))]
        );
        assert_eq!(sums(&[(1, "-0.00")]), vec![(1, scaled(0, 2))]);
    }

    #[test]
    fn deferred_credits_over_parts_are_the_credits_of_all_the_rows_at_once() {
        let big = "9".repeat(39);
        let rows = [
            (2, "1.50"),
            (1, "10"),
            (1, big.as_str()),
            (2, "-0.125"),
            (1, "1e2"),
        ];
        let parsed: Vec<_> = rows
            .iter()
            .map(|(account, text)| (*account, parse_amount(text).unwrap(), Timestamp(0)))
            .collect();
        let mut deferred = Deferred::default();
        deferred.add(parsed[..2].iter().copied());
        deferred.add(parsed[2..].iter().copied());
        let shown = |credits: Vec<Credit<'_>>| {
            credits
                .into_iter()
                .map(|c| (c.account_id, format!("{:?}", c.amount)))
                .collect::<Vec<_>>()
        };
        assert_eq!(shown(deferred.credits()), sums(&rows));
    }

    #[test]
    fn what_does_not_fit_is_a_credit_of_its_own() {
        let big = "9".repeat(39);
        let credits = sums(&[(1, "1"), (1, &big), (1, "2"), (2, "1e40")]);
        assert_eq!(credits.len(), 3, "{credits:?}");
        assert_eq!(credits.iter().filter(|(a, _)| *a == 1).count(), 2);
        // A sum that would overflow leaves the partial sum as it was.
        let max = i128::MAX.to_string();
        let credits = sums(&[(1, &max), (1, "1"), (1, "-1")]);
        assert_eq!(credits.len(), 2, "{credits:?}");
    }
}

#!/usr/bin/env python3
"""The seed's consumer, as the baseline users have today (shared/seed, "transfer_kafka_to_inbox").

One Kafka record at a time: parse the JSON value, then ONE pg_end transaction with the
insert into main.transactions and the balance upsert, then commit the record's offset
(`consumer.commit(message=msg)`, asynchronous, as the seed did). A duplicate id is skipped
by the primary key, as in the seed.

Usage: naive_consumer.py BROKERS TOPIC GROUP PG_END_URL COUNT
Stops after COUNT records and prints one JSON line: {"count": …, "seconds": …}.
"""

import json
import os
import sys
import time

import psycopg
from confluent_kafka import Consumer

INSERT = (
    "INSERT INTO main.transactions (id, account_id, amount, created_at) "
    "VALUES (%s, %s, %s, %s)"
)
UPSERT = (
    "INSERT INTO main.balance AS balance (account_id, current_balance, updated_at) "
    "VALUES (%s, %s, %s) ON CONFLICT (account_id) DO UPDATE "
    "SET current_balance = balance.current_balance + EXCLUDED.current_balance, "
    "updated_at = EXCLUDED.updated_at RETURNING current_balance"
)


def main() -> int:
    brokers, topic, group, url, count = sys.argv[1:6]
    count = int(count)
    started = time.monotonic()
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # The relay's topics are written transactionally; the seed's consumer had the
            # default (read_uncommitted), which would also work here since every
            # transaction committed, but read_committed is the honest setting.
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    done = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while done < count:
            msg = consumer.poll(timeout=1.0)
            if msg is None or msg.error():
                continue
            message = json.loads(msg.value())
            try:
                with conn.transaction():
                    conn.execute(
                        INSERT,
                        (
                            message["id"],
                            message["account_id"],
                            message["amount"],
                            message["created_at"],
                        ),
                    )
                    conn.execute(
                        UPSERT,
                        (message["account_id"], message["amount"], message["created_at"]),
                    )
            except psycopg.errors.UniqueViolation:
                pass
            consumer.commit(message=msg)
            done += 1
    seconds = time.monotonic() - started
    print(json.dumps({"count": done, "seconds": seconds}), flush=True)
    # No consumer.close(): the seed's consumer never left its group either, and leaving
    # takes seconds that are not part of the work measured.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# Usage: python3 scripts/bench.d/kafka_latency_probe.py BROKERS plain|txn [FETCH_WAIT_MAX_MS]
# The brokers alone, no relay: a record produced (acks=all, idempotent; with txn, one
# Kafka transaction per record) every 20 ms, read by a read_committed consumer; prints
# p50/p99/max of produce -> consume. The floor under the Kafka path's latency.

import sys, time, threading, statistics, uuid
from confluent_kafka import Producer, Consumer
from confluent_kafka.admin import AdminClient, NewTopic
brokers = sys.argv[1]; mode = sys.argv[2]  # plain | txn
topic = f"probe-{uuid.uuid4().hex[:8]}"
admin = AdminClient({"bootstrap.servers": brokers}); admin.create_topics([NewTopic(topic, 3, 3, config={"min.insync.replicas": "2"})])[topic].result()
time.sleep(2)
lat = []
c = Consumer({"bootstrap.servers": brokers, "group.id": topic, "auto.offset.reset": "earliest",
              "isolation.level": "read_committed", "fetch.wait.max.ms": sys.argv[3] if len(sys.argv) > 3 else "100"})
c.subscribe([topic])
stop = False
def consume():
    while not stop:
        m = c.poll(0.1)
        if m is None or m.error(): continue
        lat.append(time.time() - float(m.value()))
t = threading.Thread(target=consume); t.start()
time.sleep(3)
conf = {"bootstrap.servers": brokers, "acks": "all", "enable.idempotence": True, "linger.ms": 2}
if mode == "txn": conf["transactional.id"] = topic
p = Producer(conf)
if mode == "txn": p.init_transactions()
for i in range(300):
    if mode == "txn": p.begin_transaction()
    p.produce(topic, key=str(i % 10), value=repr(time.time()))
    if mode == "txn": p.commit_transaction()
    else: p.flush()
    time.sleep(0.02)
time.sleep(2); stop = True; t.join()
lat.sort(); ms = [x * 1000 for x in lat]
print(f"{mode}: n={len(ms)} p50={ms[len(ms)//2]:.1f} ms p99={ms[int(len(ms)*0.99)]:.1f} ms max={ms[-1]:.1f} ms")

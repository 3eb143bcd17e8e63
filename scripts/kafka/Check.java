// Readiness probe for the local Kafka cluster, run by scripts/stack with Java's single-file source
// launcher against the broker jars (kafka-clients is one of them), so no kafka-tools jar, Python or
// rdkafka build is needed:
//
//   java -cp '<state>/kafka-libs/*' scripts/kafka/Check.java BOOTSTRAP cluster BROKERS TIMEOUT_S
//   java -cp '<state>/kafka-libs/*' scripts/kafka/Check.java BOOTSTRAP node NODE_ID TIMEOUT_S
//
// "cluster": waits until BROKERS brokers are registered and unfenced, then creates (if absent) the
// topic __stack_check with 3 partitions and replication factor 3, and waits until every partition
// has a leader and a full ISR: the proof that the cluster can really serve replicated writes.
// Then it moves every partition's leadership to its preferred replica (a preferred leader
// election, as an operator runs after a restart), for up to 60 s: brokers that start one after
// the other leave the first one leading every existing partition, and the controller's own
// rebalance (auto.leader.rebalance.enable, every leader.imbalance.check.interval.seconds = 300)
// would move them five minutes later, in the middle of whatever runs then: every transaction
// coordinator moves, and transactional producers stall for 1-2 s (bench notes, twenty-sixth
// session). Partitions it cannot move in time are left to the controller, with a warning.
// "node": waits until broker NODE_ID is registered and unfenced (used after `stack start kafkaN`).
// Retries until TIMEOUT_S; exit 0 on success, 1 on timeout (with the last error), 2 on bad usage.

import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.stream.Collectors;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.ElectionType;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.TopicPartitionInfo;
import org.apache.kafka.common.errors.ElectionNotNeededException;
import org.apache.kafka.common.errors.RetriableException;
import org.apache.kafka.common.errors.TopicExistsException;

public class Check {
    static final String TOPIC = "__stack_check";
    static final int PARTITIONS = 3;
    static final short REPLICATION = 3;

    // Why the last attempt was not ready; printed only if the deadline passes.
    static String reason = "no answer yet";

    public static void main(String[] args) throws Exception {
        if (args.length != 4 || !(args[1].equals("cluster") || args[1].equals("node"))) {
            System.err.println("usage: Check BOOTSTRAP (cluster BROKERS | node NODE_ID) TIMEOUT_S");
            System.exit(2);
        }
        String bootstrap = args[0];
        boolean cluster = args[1].equals("cluster");
        int target = Integer.parseInt(args[2]);
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[3]));

        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, 5000);
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 10000);
        // Brokers that are still starting refuse connections; do not back off for long.
        props.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, 1000);

        try (Admin admin = Admin.create(props)) {
            while (System.nanoTime() < deadline) {
                try {
                    String ok = cluster ? checkCluster(admin, target) : checkNode(admin, target);
                    if (ok != null) {
                        System.out.println(ok);
                        if (cluster) {
                            balance(admin, Math.min(deadline, System.nanoTime() + TimeUnit.SECONDS.toNanos(60)));
                        }
                        return;
                    }
                } catch (ExecutionException e) {
                    reason = String.valueOf(e.getCause());
                } catch (TimeoutException | RuntimeException e) {
                    reason = e.toString();
                }
                Thread.sleep(1000);
            }
        }
        System.err.println("kafka check timed out on " + bootstrap + ": " + reason);
        System.exit(1);
    }

    static Collection<Node> brokers(Admin admin) throws Exception {
        return admin.describeCluster().nodes().get(10, TimeUnit.SECONDS);
    }

    static String checkNode(Admin admin, int nodeId) throws Exception {
        Collection<Node> nodes = brokers(admin);
        boolean present = nodes.stream().anyMatch(n -> n.id() == nodeId);
        if (!present) {
            reason = "broker " + nodeId + " not yet in " + ids(nodes);
            return null;
        }
        return "kafka: broker " + nodeId + " is registered; brokers " + ids(nodes);
    }

    static String checkCluster(Admin admin, int expected) throws Exception {
        Collection<Node> nodes = brokers(admin);
        if (nodes.size() < expected) {
            reason = "brokers " + ids(nodes) + ", want " + expected;
            return null;
        }
        Set<String> names = admin.listTopics().names().get(10, TimeUnit.SECONDS);
        if (!names.contains(TOPIC)) {
            try {
                admin.createTopics(List.of(new NewTopic(TOPIC, PARTITIONS, REPLICATION)))
                        .all().get(10, TimeUnit.SECONDS);
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) throw e;
            }
        }
        Map<String, TopicDescription> d =
                admin.describeTopics(List.of(TOPIC)).allTopicNames().get(10, TimeUnit.SECONDS);
        for (TopicPartitionInfo p : d.get(TOPIC).partitions()) {
            if (p.leader() == null || p.leader().isEmpty() || p.isr().size() < p.replicas().size()) {
                reason = TOPIC + " partition " + p.partition() + " leader=" + p.leader()
                        + " isr=" + ids(p.isr());
                return null;
            }
        }
        return "kafka: brokers " + ids(nodes) + "; topic " + TOPIC + " has "
                + d.get(TOPIC).partitions().size() + " partitions with a leader and full ISR";
    }

    // Preferred leader election over every partition until none is left to move (an election
    // that is not needed is the goal) or the deadline passes. A replica that is not back in the
    // ISR yet cannot lead: retried every second.
    static void balance(Admin admin, long deadline) throws InterruptedException {
        String left = "no answer yet";
        while (System.nanoTime() < deadline) {
            try {
                Map<TopicPartition, Optional<Throwable>> results =
                        admin.electLeaders(ElectionType.PREFERRED, null).partitions().get(30, TimeUnit.SECONDS);
                long moved = results.values().stream().filter(Optional::isEmpty).count();
                List<String> pending = results.entrySet().stream()
                        .filter(e -> e.getValue().isPresent()
                                && !(e.getValue().get() instanceof ElectionNotNeededException))
                        .map(e -> e.getKey() + ": " + e.getValue().get().getClass().getSimpleName())
                        .sorted()
                        .collect(Collectors.toList());
                if (moved > 0) {
                    System.out.println("kafka: moved the leadership of " + moved + " partitions to their preferred replicas");
                }
                if (pending.isEmpty()) {
                    return;
                }
                left = pending.size() + " partitions, e.g. " + pending.get(0);
                if (results.values().stream().flatMap(Optional::stream).anyMatch(
                        e -> !(e instanceof ElectionNotNeededException || e instanceof RetriableException))) {
                    break; // e.g. not authorized: waiting does not help
                }
            } catch (ExecutionException e) {
                left = String.valueOf(e.getCause());
                if (!(e.getCause() instanceof RetriableException)) {
                    break;
                }
            } catch (TimeoutException | RuntimeException e) {
                left = e.toString();
            }
            Thread.sleep(1000);
        }
        System.err.println("kafka: warning: leadership not on the preferred replicas yet (" + left
                + "); the controller moves it within leader.imbalance.check.interval.seconds");
    }

    static String ids(Collection<Node> nodes) {
        return nodes.stream().map(Node::id).sorted().map(String::valueOf)
                .collect(Collectors.joining(",", "[", "]"));
    }
}

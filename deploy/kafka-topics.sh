#!/bin/sh
# Create smtpguard's topics on an Apache Kafka cluster (docs/DEPLOYMENT.md, "Kafka").
# Usage: BOOTSTRAP=kafka-1:9093 [CONFIG=admin.properties] [PARTITIONS=24] [REPLICAS=3] [OCSF_TOPIC=smtp.alerts.ocsf] sh kafka-topics.sh
set -eu
: "${BOOTSTRAP:?set BOOTSTRAP=host:port}"
PARTITIONS="${PARTITIONS:-24}"
REPLICAS="${REPLICAS:-3}"
KT="${KAFKA_TOPICS:-kafka-topics.sh}"
cmd() { "$KT" --bootstrap-server "$BOOTSTRAP" ${CONFIG:+--command-config "$CONFIG"} "$@"; }

# flows: the detectors' input, keyed by source; partitions bound how many detectors share the work
cmd --create --if-not-exists --topic smtp.flows --partitions "$PARTITIONS" --replication-factor "$REPLICAS" \
    --config retention.ms=86400000 --config min.insync.replicas=2 --config compression.type=producer
# dead letters: kept a week for inspection
cmd --create --if-not-exists --topic smtp.flows.dlq --partitions 3 --replication-factor "$REPLICAS" \
    --config retention.ms=604800000 --config min.insync.replicas=2
# alerts: the response service's input and the SIEM's feed, keyed by source or tenant
cmd --create --if-not-exists --topic smtp.alerts --partitions 6 --replication-factor "$REPLICAS" \
    --config retention.ms=2592000000 --config min.insync.replicas=2
# enforcement: the network's view of every exemption, keyed by address or prefix; compacted so a new
# consumer reads the current state of every key, never the whole history
cmd --create --if-not-exists --topic smtp.enforcement --partitions 3 --replication-factor "$REPLICAS" \
    --config cleanup.policy=compact --config min.insync.replicas=2 \
    --config min.compaction.lag.ms=3600000 --config delete.retention.ms=86400000
# the alerts as OCSF findings for a SIEM, when kafka.topics.ocsf names a topic
if [ -n "${OCSF_TOPIC:-}" ]; then
    cmd --create --if-not-exists --topic "$OCSF_TOPIC" --partitions 6 --replication-factor "$REPLICAS" \
        --config retention.ms=2592000000 --config min.insync.replicas=2
fi

// Package worker will own the queue workers that drain low-priority jobs
// from NATS JetStream into the headroom synchronous traffic leaves. It is
// empty until that milestone lands.
package worker

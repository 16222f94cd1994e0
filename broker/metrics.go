package broker

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	failovers *prometheus.CounterVec
	latency   *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer, b *Broker) *metrics {
	m := &metrics{
		failovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "levee_upstream_failovers_total",
			Help: "Calls moved off a deployment, by reason (429, 5xx, error).",
		}, []string{"deployment", "reason"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "levee_upstream_duration_seconds",
			Help:    "Time from sending a call to a deployment to finishing its body.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12),
		}, []string{"deployment"}),
	}
	if reg == nil {
		return m
	}
	reg.MustRegister(m.failovers, m.latency, deploymentCollector{b})
	return m
}

var (
	deploymentLabels = []string{"deployment", "kind"}
	headroomDesc     = prometheus.NewDesc("levee_deployment_headroom_tokens", "Tokens a deployment can still take in its sliding minute.", deploymentLabels, nil)
	usedDesc         = prometheus.NewDesc("levee_deployment_used_tokens", "Tokens charged to a deployment in its sliding minute (this process's view, shared across processes when capacity sharing is on).", deploymentLabels, nil)
	limitDesc        = prometheus.NewDesc("levee_deployment_limit_tokens", "A deployment's tokens-per-minute limit.", deploymentLabels, nil)
	reserveDesc      = prometheus.NewDesc("levee_deployment_sync_reserve_ratio", "Share of a deployment's tokens per minute queue workers leave to synchronous calls now (with sync_reserve auto, it follows the synchronous demand).", deploymentLabels, nil)
	circuitDesc      = prometheus.NewDesc("levee_deployment_circuit_open", "1 while a deployment's circuit is open.", deploymentLabels, nil)
	chargedDesc      = prometheus.NewDesc("levee_deployment_charged_tokens_total",
		"Tokens this process charged to a deployment, by class: sync (calls served while the caller waits) or background (queue workers).",
		[]string{"deployment", "kind", "class"}, nil)
)

// deploymentCollector reports the deployments being served at scrape time,
// so a reload that adds or removes one changes what is reported.
type deploymentCollector struct{ b *Broker }

func (deploymentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{headroomDesc, usedDesc, limitDesc, reserveDesc, circuitDesc, chargedDesc} {
		ch <- d
	}
}

func (c deploymentCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, d := range c.b.Deployments() {
		name, kind := d.Name, string(d.Kind)
		tok, _ := d.Capacity.Headroom(now)
		limit, _ := d.Capacity.Limits()
		used, syncCharged, bgCharged := d.Capacity.Charged(now)
		open := 0.0
		if d.circuit.isOpen() {
			open = 1
		}
		ch <- prometheus.MustNewConstMetric(headroomDesc, prometheus.GaugeValue, float64(tok), name, kind)
		ch <- prometheus.MustNewConstMetric(usedDesc, prometheus.GaugeValue, float64(used), name, kind)
		ch <- prometheus.MustNewConstMetric(limitDesc, prometheus.GaugeValue, float64(limit), name, kind)
		ch <- prometheus.MustNewConstMetric(reserveDesc, prometheus.GaugeValue, d.Capacity.SyncReserve(now), name, kind)
		ch <- prometheus.MustNewConstMetric(circuitDesc, prometheus.GaugeValue, open, name, kind)
		ch <- prometheus.MustNewConstMetric(chargedDesc, prometheus.CounterValue, float64(syncCharged), name, kind, "sync")
		ch <- prometheus.MustNewConstMetric(chargedDesc, prometheus.CounterValue, float64(bgCharged), name, kind, "background")
	}
}

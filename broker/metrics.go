package broker

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	failovers *prometheus.CounterVec
	latency   *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer, deps []*Deployment) *metrics {
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
	reg.MustRegister(m.failovers, m.latency)
	for _, d := range deps {
		d := d
		labels := prometheus.Labels{"deployment": d.Name, "kind": string(d.Kind)}
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "levee_deployment_headroom_tokens", Help: "Tokens a deployment can still take in its sliding minute.", ConstLabels: labels,
		}, func() float64 { t, _ := d.Capacity.Headroom(time.Now()); return float64(t) }))
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "levee_deployment_circuit_open", Help: "1 while a deployment's circuit is open.", ConstLabels: labels,
		}, func() float64 {
			if d.circuit.isOpen() {
				return 1
			}
			return 0
		}))
	}
	return m
}

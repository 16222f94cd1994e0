package main

import (
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/levee-gw/levee/config"
)

// goTypes maps apiVersion/kind to a new value of its official Go type. An
// object is decoded into it strictly: an unknown or repeated field, or a
// value of the wrong type, is an error, as the API server's strict field
// validation would make it.
var goTypes = map[string]func() any{
	"v1/ConfigMap":                            func() any { return new(corev1.ConfigMap) },
	"v1/Service":                              func() any { return new(corev1.Service) },
	"v1/ServiceAccount":                       func() any { return new(corev1.ServiceAccount) },
	"apps/v1/Deployment":                      func() any { return new(appsv1.Deployment) },
	"batch/v1/Job":                            func() any { return new(batchv1.Job) },
	"autoscaling/v2/HorizontalPodAutoscaler":  func() any { return new(autoscalingv2.HorizontalPodAutoscaler) },
	"policy/v1/PodDisruptionBudget":           func() any { return new(policyv1.PodDisruptionBudget) },
	"monitoring.coreos.com/v1/ServiceMonitor": func() any { return new(monitoringv1.ServiceMonitor) },
	// keda.sh/v1alpha1/ScaledObject is checked against KEDA's CRD schema.
}

// object is a decoded manifest.
type object struct {
	source, kind, name string
	value              any
}

// decode validates one manifest and returns its typed object (nil when it
// cannot be read at all).
func (c *checker) decode(m manifest) (*object, []error) {
	raw, err := yaml.YAMLToJSONStrict([]byte(m.body))
	if err != nil {
		return nil, []error{problem{file: m.source, msg: "not valid YAML: " + err.Error()}}
	}
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(raw, &head); err != nil {
		return nil, []error{problem{file: m.source, msg: err.Error()}}
	}
	o := &object{source: m.source, kind: head.Kind, name: head.Metadata.Name}
	if head.Metadata.Name == "" {
		return nil, []error{problem{file: m.source, field: "metadata.name", msg: "missing"}}
	}
	if head.APIVersion == "keda.sh/v1alpha1" && head.Kind == "ScaledObject" {
		so, errs := c.decodeScaledObject(m.source, raw)
		o.value = so
		return o, errs
	}
	newValue, ok := goTypes[head.APIVersion+"/"+head.Kind]
	if !ok {
		return nil, []error{problem{file: m.source, field: "apiVersion", msg: fmt.Sprintf("no schema to check %s %s against", head.APIVersion, head.Kind)}}
	}
	o.value = newValue()
	return o, strictDecode(m.source, raw, o.value)
}

// strictDecode decodes raw into v; every unknown or repeated field and
// every mistyped value is a problem naming its path.
func strictDecode(file string, raw []byte, v any) []error {
	strict, err := sigsjson.UnmarshalStrict(raw, v, sigsjson.DisallowDuplicateFields, sigsjson.DisallowUnknownFields)
	var errs []error
	if err != nil {
		errs = append(errs, problem{file: file, msg: err.Error()})
	}
	for _, e := range strict {
		errs = append(errs, problem{file: file, msg: e.Error()})
	}
	return errs
}

// validateRender validates every manifest of one render, counts the kinds,
// and checks that the objects fit together.
func (c *checker) validateRender(ms []manifest, vs valueSet) []error {
	var errs []error
	var objs []*object
	count := map[string]int{}
	for _, m := range ms {
		o, oerrs := c.decode(m)
		for _, e := range oerrs {
			errs = append(errs, tagged(e, vs.name))
		}
		if o != nil {
			objs = append(objs, o)
			count[o.kind]++
		}
	}
	for _, kind := range slices.Sorted(mapsKeys(vs.want, count)) {
		if count[kind] != vs.want[kind] {
			errs = append(errs, problem{file: chartDir, msg: fmt.Sprintf("[%s] renders %d %s, want %d", vs.name, count[kind], kind, vs.want[kind])})
		}
	}
	for _, e := range c.consistent(objs) {
		errs = append(errs, tagged(e, vs.name))
	}
	return errs
}

// tagged says which render a problem came from.
func tagged(err error, render string) error {
	if p, ok := err.(problem); ok {
		p.msg = "[" + render + "] " + p.msg
		return p
	}
	return fmt.Errorf("[%s] %w", render, err)
}

func mapsKeys(ms ...map[string]int) func(func(string) bool) {
	return func(yield func(string) bool) {
		seen := map[string]bool{}
		for _, m := range ms {
			for k := range m {
				if !seen[k] {
					seen[k] = true
					if !yield(k) {
						return
					}
				}
			}
		}
	}
}

// consistent checks what no schema says: that the objects refer to each
// other correctly, and that the pods are run the way the chart promises
// (non-root, read-only root file system, probes, resources).
func (c *checker) consistent(objs []*object) []error {
	var errs []error
	add := func(o *object, field, format string, args ...any) {
		errs = append(errs, problem{file: o.source, field: field, msg: fmt.Sprintf(format, args...)})
	}
	deployments := map[string]*appsv1.Deployment{}
	var services []*object
	for _, o := range objs {
		switch v := o.value.(type) {
		case *appsv1.Deployment:
			deployments[o.name] = v
		case *corev1.Service:
			services = append(services, o)
		}
	}
	// scaled are the Deployments an autoscaler owns: they must not set
	// replicas, or every upgrade resets what the autoscaler chose.
	scaled := func(o *object, field, target string) {
		d, ok := deployments[target]
		if !ok {
			add(o, field, "names Deployment %q, which the chart does not render", target)
			return
		}
		if d.Spec.Replicas != nil {
			add(o, field, "Deployment %q is autoscaled but sets spec.replicas", target)
		}
	}
	for _, o := range objs {
		switch v := o.value.(type) {
		case *appsv1.Deployment:
			if v.Spec.Selector == nil || !matches(v.Spec.Selector.MatchLabels, v.Spec.Template.Labels) {
				add(o, "spec.selector.matchLabels", "does not select the pod template's labels %v", v.Spec.Template.Labels)
			}
			errs = append(errs, podProblems(o, "spec.template.spec", v.Spec.Template.Spec, true)...)
		case *batchv1.Job:
			hooks := strings.Split(v.Annotations["helm.sh/hook"], ",")
			if !slices.Contains(hooks, "pre-install") || !slices.Contains(hooks, "pre-upgrade") {
				add(o, `metadata.annotations["helm.sh/hook"]`, "is %q; migrations must run pre-install and pre-upgrade", v.Annotations["helm.sh/hook"])
			}
			if rp := v.Spec.Template.Spec.RestartPolicy; rp != corev1.RestartPolicyNever && rp != corev1.RestartPolicyOnFailure {
				add(o, "spec.template.spec.restartPolicy", "is %q; a Job's pods need Never or OnFailure", rp)
			}
			errs = append(errs, podProblems(o, "spec.template.spec", v.Spec.Template.Spec, false)...)
		case *corev1.Service:
			d, dname := selected(deployments, v.Spec.Selector)
			if d == nil {
				add(o, "spec.selector", "selects no Deployment's pods")
				continue
			}
			for i, p := range v.Spec.Ports {
				if p.TargetPort.StrVal != "" && !hasPort(d.Spec.Template.Spec, p.TargetPort.StrVal) {
					add(o, fmt.Sprintf("spec.ports[%d].targetPort", i), "names port %q, which Deployment %q's containers do not have", p.TargetPort.StrVal, dname)
				}
			}
		case *autoscalingv2.HorizontalPodAutoscaler:
			if v.Spec.ScaleTargetRef.Kind != "Deployment" {
				add(o, "spec.scaleTargetRef.kind", "is %q, want Deployment", v.Spec.ScaleTargetRef.Kind)
			}
			scaled(o, "spec.scaleTargetRef.name", v.Spec.ScaleTargetRef.Name)
			if v.Spec.MinReplicas != nil && *v.Spec.MinReplicas > v.Spec.MaxReplicas {
				add(o, "spec.minReplicas", "%d is above spec.maxReplicas %d", *v.Spec.MinReplicas, v.Spec.MaxReplicas)
			}
		case *policyv1.PodDisruptionBudget:
			if v.Spec.Selector == nil {
				add(o, "spec.selector", "missing")
			} else if d, _ := selected(deployments, v.Spec.Selector.MatchLabels); d == nil {
				add(o, "spec.selector.matchLabels", "selects no Deployment's pods")
			}
		case *monitoringv1.ServiceMonitor:
			var ports []string
			for _, s := range services {
				svc := s.value.(*corev1.Service)
				if matches(v.Spec.Selector.MatchLabels, svc.Labels) {
					for _, p := range svc.Spec.Ports {
						ports = append(ports, p.Name)
					}
				}
			}
			if len(ports) == 0 {
				add(o, "spec.selector.matchLabels", "selects no Service")
			}
			for i, ep := range v.Spec.Endpoints {
				if !slices.Contains(ports, ep.Port) {
					add(o, fmt.Sprintf("spec.endpoints[%d].port", i), "names port %q, which no selected Service has (%v)", ep.Port, ports)
				}
			}
		case *scaledObject:
			scaled(o, "spec.scaleTargetRef.name", v.Spec.ScaleTargetRef.Name)
			errs = append(errs, c.scaledObjectProblems(o, v)...)
		case *corev1.ConfigMap:
			raw, ok := v.Data["levee.yaml"]
			if !ok {
				add(o, "data", "has no levee.yaml")
				continue
			}
			errs = append(errs, leveeConfigProblems(o.source+` data["levee.yaml"]`, []byte(raw), deployments)...)
		}
	}
	return errs
}

// podProblems checks a pod template as the chart promises to run it.
func podProblems(o *object, at string, spec corev1.PodSpec, serving bool) []error {
	var errs []error
	add := func(field, format string, args ...any) {
		errs = append(errs, problem{file: o.source, field: at + "." + field, msg: fmt.Sprintf(format, args...)})
	}
	podNonRoot := spec.SecurityContext != nil && spec.SecurityContext.RunAsNonRoot != nil && *spec.SecurityContext.RunAsNonRoot
	if len(spec.Containers) == 0 {
		add("containers", "none")
	}
	for i, ct := range spec.Containers {
		field := fmt.Sprintf("containers[%d]", i)
		sc := ct.SecurityContext
		if !podNonRoot && (sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot) {
			add(field+".securityContext.runAsNonRoot", "must be true (here or in the pod's securityContext)")
		}
		if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			add(field+".securityContext.readOnlyRootFilesystem", "must be true")
		}
		if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			add(field+".securityContext.allowPrivilegeEscalation", "must be false")
		}
		if len(ct.Resources.Requests) == 0 {
			add(field+".resources.requests", "none: the scheduler and the autoscalers need them")
		}
		if !serving {
			continue
		}
		for name, p := range map[string]*corev1.Probe{"livenessProbe": ct.LivenessProbe, "readinessProbe": ct.ReadinessProbe} {
			switch {
			case p == nil || p.HTTPGet == nil:
				add(field+"."+name, "missing: Levee serves /healthz (and /readyz on the API)")
			case p.HTTPGet.Path != "/healthz" && p.HTTPGet.Path != "/readyz":
				add(field+"."+name+".httpGet.path", "is %q; Levee serves /healthz and /readyz", p.HTTPGet.Path)
			case p.HTTPGet.Port.StrVal != "" && !hasPort(spec, p.HTTPGet.Port.StrVal):
				add(field+"."+name+".httpGet.port", "names port %q, which the container does not have", p.HTTPGet.Port.StrVal)
			}
		}
	}
	return errs
}

// leveeConfigProblems loads a Levee config as `levee serve` would, with
// every credential variable set (the Secrets provide them), and checks its
// listen port against the gateway's container port.
func leveeConfigProblems(file string, raw []byte, deployments map[string]*appsv1.Deployment) []error {
	getenv := func(name string) string {
		if name == "LEVEE_ADMIN_KEY" {
			return "" // an admin key must look like one; none is valid
		}
		return "set-from-a-secret"
	}
	cfg, err := config.Parse(raw, getenv)
	if err != nil {
		return []error{problem{file: file, msg: err.Error()}}
	}
	if deployments == nil {
		return nil
	}
	_, port, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return []error{problem{file: file, field: "listen", msg: err.Error()}}
	}
	for name, d := range deployments {
		for _, ct := range d.Spec.Template.Spec.Containers {
			if slices.Contains(ct.Args, "serve") {
				for _, p := range ct.Ports {
					if p.Name == "http" && strconv.Itoa(int(p.ContainerPort)) != port {
						return []error{problem{file: file, field: "listen", msg: fmt.Sprintf("port %s, but Deployment %q's container port http is %d", port, name, p.ContainerPort)}}
					}
				}
			}
		}
	}
	return nil
}

// matches reports whether every selector label is in labels.
func matches(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// selected is the one Deployment whose pods a selector selects.
func selected(deployments map[string]*appsv1.Deployment, selector map[string]string) (*appsv1.Deployment, string) {
	var found *appsv1.Deployment
	var name string
	for n, d := range deployments {
		if matches(selector, d.Spec.Template.Labels) {
			if found != nil {
				return nil, "" // selecting two Deployments' pods is a mistake too
			}
			found, name = d, n
		}
	}
	return found, name
}

func hasPort(spec corev1.PodSpec, name string) bool {
	for _, ct := range spec.Containers {
		for _, p := range ct.Ports {
			if p.Name == name {
				return true
			}
		}
	}
	return false
}

// metaFromRaw strictly decodes an object's metadata (for kinds checked
// against a CRD schema, whose metadata the schema leaves open).
func metaFromRaw(file string, raw json.RawMessage) []error {
	var m metav1.ObjectMeta
	var errs []error
	for _, e := range strictDecode(file, raw, &m) {
		errs = append(errs, problem{file: file, field: "metadata", msg: e.(problem).msg})
	}
	return errs
}

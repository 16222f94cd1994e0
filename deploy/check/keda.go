package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"sync"

	"sigs.k8s.io/yaml"
)

// KEDA's ScaledObject is checked against the openAPIV3Schema of KEDA's own
// CRD, read from KEDA's module (the Go module proxy serves it): that schema
// is what the API server validates a ScaledObject with. KEDA's Go types
// were not used: their package pulls in controller-runtime and client-go's
// informers, which doubled the checker's compile time (3 minutes more CPU).
const (
	kedaModule  = "github.com/kedacore/keda/v2"
	kedaVersion = "v2.21.0"
	kedaCRD     = "config/crd/bases/keda.sh_scaledobjects.yaml"
)

// schema is the part of a structural OpenAPI v3 schema that KEDA's CRD uses.
type schema struct {
	Type                 string             `json:"type"`
	Properties           map[string]*schema `json:"properties"`
	AdditionalProperties *schema            `json:"additionalProperties"`
	Items                *schema            `json:"items"`
	Required             []string           `json:"required"`
	Enum                 []any              `json:"enum"`
	Minimum              *float64           `json:"minimum"`
	Maximum              *float64           `json:"maximum"`
	MinItems             *int               `json:"minItems"`
	MinLength            *int               `json:"minLength"`
	Pattern              string             `json:"pattern"`
	Nullable             bool               `json:"nullable"`
	IntOrString          bool               `json:"x-kubernetes-int-or-string"`
	PreserveUnknown      bool               `json:"x-kubernetes-preserve-unknown-fields"`
}

var (
	kedaOnce   sync.Once
	kedaSchema *schema
	kedaErr    error
)

// scaledObjectSchema loads the v1alpha1 schema of KEDA's ScaledObject CRD.
func scaledObjectSchema() (*schema, error) {
	kedaOnce.Do(func() {
		out, err := exec.Command("go", "mod", "download", "-json", kedaModule+"@"+kedaVersion).Output()
		if err != nil {
			kedaErr = fmt.Errorf("go mod download %s@%s: %w", kedaModule, kedaVersion, err)
			return
		}
		var mod struct{ Dir, Error string }
		if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
			kedaErr = fmt.Errorf("go mod download %s@%s: %v %s", kedaModule, kedaVersion, err, mod.Error)
			return
		}
		raw, err := os.ReadFile(filepath.Join(mod.Dir, kedaCRD))
		if err != nil {
			kedaErr = err
			return
		}
		var crd struct {
			Spec struct {
				Versions []struct {
					Name   string `json:"name"`
					Schema struct {
						OpenAPIV3Schema *schema `json:"openAPIV3Schema"`
					} `json:"schema"`
				} `json:"versions"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal(raw, &crd); err != nil {
			kedaErr = fmt.Errorf("%s: %w", kedaCRD, err)
			return
		}
		for _, v := range crd.Spec.Versions {
			if v.Name == "v1alpha1" {
				kedaSchema = v.Schema.OpenAPIV3Schema
			}
		}
		if kedaSchema == nil {
			kedaErr = fmt.Errorf("%s: no v1alpha1 schema", kedaCRD)
		}
	})
	return kedaSchema, kedaErr
}

// validate checks v (decoded from JSON) against s; each problem names its
// path. An object's unknown field is an error unless the schema preserves
// unknown fields or gives a schema for any key (a map).
func (s *schema) validate(path string, v any) []string {
	if v == nil {
		if s.Nullable {
			return nil
		}
		return []string{path + ": must not be null"}
	}
	var out []string
	bad := func(format string, args ...any) { out = append(out, path+": "+fmt.Sprintf(format, args...)) }
	if s.IntOrString {
		switch x := v.(type) {
		case string:
		case float64:
			if x != math.Trunc(x) {
				bad("must be an integer or a string")
			}
		default:
			bad("must be an integer or a string")
		}
		return out
	}
	switch s.Type {
	case "object":
		m, ok := v.(map[string]any)
		if !ok {
			bad("must be an object")
			return out
		}
		for _, k := range s.Required {
			if _, ok := m[k]; !ok {
				out = append(out, join(path, k)+": required")
			}
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			switch {
			case s.Properties[k] != nil:
				out = append(out, s.Properties[k].validate(join(path, k), m[k])...)
			case s.AdditionalProperties != nil:
				out = append(out, s.AdditionalProperties.validate(join(path, k), m[k])...)
			case !s.PreserveUnknown:
				out = append(out, join(path, k)+": unknown field")
			}
		}
	case "array":
		a, ok := v.([]any)
		if !ok {
			bad("must be an array")
			return out
		}
		if s.MinItems != nil && len(a) < *s.MinItems {
			bad("needs at least %d items", *s.MinItems)
		}
		if s.Items != nil {
			for i, x := range a {
				out = append(out, s.Items.validate(fmt.Sprintf("%s[%d]", path, i), x)...)
			}
		}
	case "string":
		str, ok := v.(string)
		if !ok {
			bad("must be a string")
			return out
		}
		if s.MinLength != nil && len(str) < *s.MinLength {
			bad("must be at least %d characters", *s.MinLength)
		}
		if s.Pattern != "" {
			if re, err := regexp.Compile(s.Pattern); err == nil && !re.MatchString(str) {
				bad("%q does not match %s", str, s.Pattern)
			}
		}
	case "integer", "number":
		n, ok := v.(float64)
		if !ok || (s.Type == "integer" && n != math.Trunc(n)) {
			bad("must be an %s", s.Type)
			return out
		}
		if s.Minimum != nil && n < *s.Minimum {
			bad("%v is below the minimum %v", n, *s.Minimum)
		}
		if s.Maximum != nil && n > *s.Maximum {
			bad("%v is above the maximum %v", n, *s.Maximum)
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			bad("must be a boolean")
		}
	}
	if len(s.Enum) > 0 && isScalar(v) && !slices.Contains(s.Enum, v) {
		bad("%v is not one of %v", v, s.Enum)
	}
	return out
}

// isScalar reports whether v can be compared with ==, as enum values are.
func isScalar(v any) bool {
	switch v.(type) {
	case string, float64, bool:
		return true
	}
	return false
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// scaledObject is what the consistency checks read of a ScaledObject.
type scaledObject struct {
	Spec struct {
		ScaleTargetRef struct {
			Name string `json:"name"`
		} `json:"scaleTargetRef"`
		MinReplicaCount *int32 `json:"minReplicaCount"`
		MaxReplicaCount *int32 `json:"maxReplicaCount"`
		Triggers        []struct {
			Type     string            `json:"type"`
			Metadata map[string]string `json:"metadata"`
		} `json:"triggers"`
	} `json:"spec"`
}

// decodeScaledObject validates a ScaledObject against KEDA's CRD schema
// (its metadata strictly against ObjectMeta, which the CRD leaves open).
func (c *checker) decodeScaledObject(file string, raw []byte) (*scaledObject, []error) {
	s, err := scaledObjectSchema()
	if err != nil {
		return nil, []error{problem{file: file, msg: "KEDA's CRD: " + err.Error()}}
	}
	var v map[string]any
	if err := json.Unmarshal(raw, &v); err != nil {
		return nil, []error{problem{file: file, msg: err.Error()}}
	}
	var errs []error
	if meta, ok := v["metadata"]; ok {
		m, _ := json.Marshal(meta)
		errs = append(errs, metaFromRaw(file, m)...)
		delete(v, "metadata")
	}
	for _, msg := range s.validate("", v) {
		errs = append(errs, problem{file: file, msg: msg + " (KEDA's ScaledObject CRD " + kedaVersion + ")"})
	}
	var so scaledObject
	if err := json.Unmarshal(raw, &so); err != nil {
		errs = append(errs, problem{file: file, msg: err.Error()})
	}
	return &so, errs
}

// triggerKeys are the metadata keys KEDA's scalers (2.21) refuse to start
// without: the CRD types metadata as a map of strings, so only the scaler
// sees them, at run time.
var triggerKeys = map[string][]string{
	"prometheus":     {"serverAddress", "query", "threshold"},
	"nats-jetstream": {"natsServerMonitoringEndpoint", "stream", "consumer"},
}

func (c *checker) scaledObjectProblems(o *object, so *scaledObject) []error {
	var errs []error
	// The CRD's one CEL rule, which a schema walk does not evaluate.
	if so.Spec.MinReplicaCount != nil {
		maxReplicas := int32(100)
		if so.Spec.MaxReplicaCount != nil {
			maxReplicas = *so.Spec.MaxReplicaCount
		}
		if *so.Spec.MinReplicaCount > maxReplicas {
			errs = append(errs, problem{file: o.source, field: "spec.minReplicaCount", msg: fmt.Sprintf("%d is above maxReplicaCount %d", *so.Spec.MinReplicaCount, maxReplicas)})
		}
	}
	for i, t := range so.Spec.Triggers {
		field := fmt.Sprintf("spec.triggers[%d]", i)
		keys, known := triggerKeys[t.Type]
		if !known {
			errs = append(errs, problem{file: o.source, field: field + ".type", msg: fmt.Sprintf("%q is not a trigger this chart is checked for", t.Type)})
			continue
		}
		for _, k := range keys {
			if t.Metadata[k] == "" {
				errs = append(errs, problem{file: o.source, field: field + ".metadata." + k, msg: "required by KEDA's " + t.Type + " scaler"})
			}
		}
		if t.Type == "prometheus" && t.Metadata["query"] != "" {
			if err := checkPromQL(t.Metadata["query"]); err != nil {
				errs = append(errs, problem{file: o.source, field: field + ".metadata.query", msg: err.Error()})
			}
		}
	}
	return errs
}

// crdcheck validates the Prometheus Operator objects (ServiceMonitor, PrometheusRule) in rendered
// Kubernetes YAML against the operator's own Go API types, strictly: an unknown or misspelt field
// anywhere in the object, a wrong type, or an unknown monitoring.coreos.com kind fails. Duration
// fields are checked against the CRDs' pattern. kubernetes-validate has no schemas for these CRDs;
// deploy/check.sh runs this on every overlay's output.
//
//	crdcheck FILE.yaml...   (or - for stdin)
package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The pattern of monitoringv1.Duration in the CRDs (kubebuilder:validation:Pattern).
var durationPattern = regexp.MustCompile(`^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$`)

func checkDuration(what string, d *monitoringv1.Duration) error {
	if d == nil || *d == "" {
		return nil
	}
	if !durationPattern.MatchString(string(*d)) {
		return fmt.Errorf("%s: %q is not a Prometheus duration", what, *d)
	}
	return nil
}

func checkServiceMonitor(doc []byte) (string, error) {
	var sm monitoringv1.ServiceMonitor
	if err := yaml.UnmarshalStrict(doc, &sm); err != nil {
		return "", err
	}
	if len(sm.Spec.Endpoints) == 0 {
		return sm.Name, errors.New("spec.endpoints is empty")
	}
	if len(sm.Spec.Selector.MatchLabels) == 0 && len(sm.Spec.Selector.MatchExpressions) == 0 {
		return sm.Name, errors.New("spec.selector selects nothing")
	}
	for i, ep := range sm.Spec.Endpoints {
		if ep.Port == "" && ep.TargetPort == nil {
			return sm.Name, fmt.Errorf("spec.endpoints[%d]: neither port nor targetPort", i)
		}
		for what, d := range map[string]*monitoringv1.Duration{"interval": &ep.Interval, "scrapeTimeout": &ep.ScrapeTimeout} {
			if err := checkDuration(fmt.Sprintf("spec.endpoints[%d].%s", i, what), d); err != nil {
				return sm.Name, err
			}
		}
	}
	return sm.Name, nil
}

func checkPrometheusRule(doc []byte) (string, error) {
	var pr monitoringv1.PrometheusRule
	if err := yaml.UnmarshalStrict(doc, &pr); err != nil {
		return "", err
	}
	if len(pr.Spec.Groups) == 0 {
		return pr.Name, errors.New("spec.groups is empty")
	}
	for g, group := range pr.Spec.Groups {
		if group.Name == "" {
			return pr.Name, fmt.Errorf("spec.groups[%d]: no name", g)
		}
		if err := checkDuration(fmt.Sprintf("spec.groups[%d].interval", g), group.Interval); err != nil {
			return pr.Name, err
		}
		for r, rule := range group.Rules {
			where := fmt.Sprintf("spec.groups[%d].rules[%d]", g, r)
			if (rule.Alert == "") == (rule.Record == "") {
				return pr.Name, fmt.Errorf("%s: exactly one of alert and record is required", where)
			}
			if rule.Expr.String() == "" {
				return pr.Name, fmt.Errorf("%s: empty expr", where)
			}
			if err := checkDuration(where+".for", rule.For); err != nil {
				return pr.Name, err
			}
			if err := checkDuration(where+".keep_firing_for", (*monitoringv1.Duration)(rule.KeepFiringFor)); err != nil {
				return pr.Name, err
			}
		}
	}
	return pr.Name, nil
}

func checkStream(name string, r io.Reader) (checked int, failures int, err error) {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(r))
	for {
		doc, err := reader.Read()
		if err == io.EOF {
			return checked, failures, nil
		}
		if err != nil {
			return checked, failures, fmt.Errorf("%s: %w", name, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var head struct {
			metav1.TypeMeta `json:",inline"`
			Metadata        struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			return checked, failures, fmt.Errorf("%s: %w", name, err)
		}
		tm := head.TypeMeta
		objName := head.Metadata.Name
		var cerr error
		switch {
		case tm.APIVersion != "monitoring.coreos.com/v1":
			if len(tm.APIVersion) > len("monitoring.coreos.com") && tm.APIVersion[:len("monitoring.coreos.com")] == "monitoring.coreos.com" {
				cerr = fmt.Errorf("apiVersion %s is not monitoring.coreos.com/v1", tm.APIVersion)
			} else {
				continue
			}
		case tm.Kind == "ServiceMonitor":
			_, cerr = checkServiceMonitor(doc)
		case tm.Kind == "PrometheusRule":
			_, cerr = checkPrometheusRule(doc)
		default:
			cerr = fmt.Errorf("unknown monitoring.coreos.com/v1 kind %q (this check knows ServiceMonitor and PrometheusRule)", tm.Kind)
		}
		checked++
		if cerr != nil {
			failures++
			fmt.Printf("  FAIL %s: %s/%s: %v\n", name, tm.Kind, objName, cerr)
		} else {
			fmt.Printf("  ok   %s: %s/%s matches the Prometheus Operator API (strict)\n", name, tm.Kind, objName)
		}
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: crdcheck FILE.yaml... (- for stdin)")
		os.Exit(2)
	}
	total, failed := 0, 0
	for _, path := range os.Args[1:] {
		var r io.Reader = os.Stdin
		if path != "-" {
			f, err := os.Open(path)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			defer f.Close()
			r = f
		}
		n, bad, err := checkStream(path, r)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		total += n
		failed += bad
	}
	if failed > 0 {
		os.Exit(1)
	}
	if total == 0 {
		fmt.Println("  FAIL no ServiceMonitor or PrometheusRule found")
		os.Exit(1)
	}
}

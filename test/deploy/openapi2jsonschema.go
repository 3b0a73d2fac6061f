//go:build ignore

// Command openapi2jsonschema turns a kube-apiserver's OpenAPI v2 document
// (GET /openapi/v2) into the JSON schemas kubeconform reads, one file per
// kind and API version, named as kubeconform looks them up
// ({{ .ResourceKind }}{{ .KindSuffix }}.json: daemonset-apps-v1.json,
// service-v1.json, storageclass-storage-v1.json). The schemas are
// "standalone-strict", like those of yannh/kubernetes-json-schema: every $ref
// is inlined and objects refuse unknown fields. So kubeconform needs no
// network: scripts/check-deploy.sh generates them once per Kubernetes version
// from the apiserver it builds, and caches them.
//
//	go run test/deploy/openapi2jsonschema.go OPENAPI.json OUTDIR
//
// (the build tag keeps it out of the module's packages: `go run` with the
// file named builds it anyway).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

type schema = map[string]any

var defs map[string]any

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: openapi2jsonschema OPENAPI.json OUTDIR")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	check(err)
	var doc struct {
		Definitions map[string]any `json:"definitions"`
	}
	check(json.Unmarshal(raw, &doc))
	if len(doc.Definitions) == 0 {
		check(fmt.Errorf("%s: no definitions", os.Args[1]))
	}
	defs = doc.Definitions
	check(os.MkdirAll(os.Args[2], 0o755))
	n := 0
	for name, d := range defs {
		def, ok := d.(map[string]any)
		if !ok {
			continue
		}
		gvks, _ := def["x-kubernetes-group-version-kind"].([]any)
		for _, g := range gvks {
			gvk, _ := g.(map[string]any)
			group, _ := gvk["group"].(string)
			version, _ := gvk["version"].(string)
			kind, _ := gvk["kind"].(string)
			if version == "" || kind == "" {
				continue
			}
			s := resolve(def, []string{name})
			s["$schema"] = "http://json-schema.org/schema#"
			out, err := json.MarshalIndent(s, "", "  ")
			check(err)
			file := filepath.Join(os.Args[2], strings.ToLower(kind)+kindSuffix(group, version)+".json")
			check(os.WriteFile(file, append(out, '\n'), 0o644))
			n++
		}
	}
	fmt.Printf("openapi2jsonschema: %d schemas in %s\n", n, os.Args[2])
}

// kindSuffix is kubeconform's (pkg/registry): "-" and the first label of the
// group, then "-" and the version; "-v1" for the core group.
func kindSuffix(group, version string) string {
	if group == "" {
		return "-" + strings.ToLower(version)
	}
	return "-" + strings.ToLower(strings.Split(group, ".")[0]) + "-" + strings.ToLower(version)
}

// resolve copies the schema s with every $ref inlined (a reference back into
// a definition being inlined becomes an open schema: only the CRD schema type
// refers to itself), and "additionalProperties": false on every object that
// lists its properties and says nothing else about extra ones.
func resolve(s map[string]any, stack []string) schema {
	if ref, ok := s["$ref"].(string); ok {
		name := strings.TrimPrefix(ref, "#/definitions/")
		switch {
		case strings.HasSuffix(name, ".util.intstr.IntOrString"):
			return schema{"type": []any{"string", "integer"}}
		case strings.HasSuffix(name, ".api.resource.Quantity"):
			return schema{"type": []any{"string", "number"}}
		}
		for _, n := range stack {
			if n == name {
				return schema{}
			}
		}
		d, ok := defs[name].(map[string]any)
		if !ok {
			check(fmt.Errorf("unresolved reference %s", ref))
		}
		r := resolve(d, append(stack, name))
		if desc, ok := s["description"]; ok {
			r["description"] = desc
		}
		return r
	}
	out := schema{}
	for k, v := range s {
		if strings.HasPrefix(k, "x-kubernetes-") {
			continue
		}
		switch k {
		case "properties", "patternProperties", "definitions":
			props := schema{}
			for pn, pv := range v.(map[string]any) {
				props[pn] = resolveAny(pv, stack)
			}
			out[k] = props
		case "items", "additionalProperties", "not":
			out[k] = resolveAny(v, stack)
		case "allOf", "anyOf", "oneOf":
			var list []any
			for _, e := range v.([]any) {
				list = append(list, resolveAny(e, stack))
			}
			out[k] = list
		default:
			out[k] = v
		}
	}
	if f, _ := out["format"].(string); f == "int-or-string" {
		out["type"] = []any{"string", "integer"}
	}
	if _, has := out["properties"]; has {
		if _, set := out["additionalProperties"]; !set {
			out["additionalProperties"] = false
		}
	}
	return out
}

func resolveAny(v any, stack []string) any {
	if m, ok := v.(map[string]any); ok {
		return resolve(m, stack)
	}
	return v
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "openapi2jsonschema:", err)
		os.Exit(1)
	}
}

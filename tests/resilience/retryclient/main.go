// retryclient: a closed-loop Classify load from grpc-go configured as deployments configure it
// behind a server with a maximum connection age: a service config whose retryPolicy retries
// UNAVAILABLE with backoff. ghz cannot apply a retry policy, so the resilience suite's "age"
// scenario runs this beside it (tests/resilience/resilience.py).
//
//	go run . -addr 127.0.0.1:50051 -image tests/data/flair_256_a.png -duration 8s -concurrency 16
//
// It prints one JSON object: calls, ok, failed (by status), and the attempts grpc-go made, split
// into transparent retries (grpc-go's own, for streams the server never processed) and retries by
// the policy. The request is encoded by hand (a ClassifyRequest with one image), so no generated
// code is needed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const method = "/brainai.v1.TumorClassifier/Classify"

// The retry policy of the call: UNAVAILABLE (a connection going away, a draining server) is
// retried up to 4 more times with 10-100 ms backoff; nothing else is.
const serviceConfig = `{
  "methodConfig": [{
    "name": [{"service": "brainai.v1.TumorClassifier"}],
    "retryPolicy": {
      "maxAttempts": 5,
      "initialBackoff": "0.01s",
      "maxBackoff": "0.1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}`

// rawCodec sends and receives already-encoded protobuf bytes.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// attempts counts the attempts grpc-go starts (one per stream it opens).
type attempts struct {
	all, transparent atomic.Int64
}

func (a *attempts) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (a *attempts) HandleRPC(_ context.Context, s stats.RPCStats) {
	if begin, ok := s.(*stats.Begin); ok && begin.IsClient() {
		a.all.Add(1)
		if begin.IsTransparentRetryAttempt {
			a.transparent.Add(1)
		}
	}
}
func (a *attempts) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (a *attempts) HandleConn(context.Context, stats.ConnStats)                       {}

// classifyRequest encodes ClassifyRequest{images: [Image{id, data}]}.
func classifyRequest(id string, data []byte) []byte {
	var image []byte
	image = protowire.AppendTag(image, 1, protowire.BytesType)
	image = protowire.AppendString(image, id)
	image = protowire.AppendTag(image, 2, protowire.BytesType)
	image = protowire.AppendBytes(image, data)
	var request []byte
	request = protowire.AppendTag(request, 1, protowire.BytesType)
	return protowire.AppendBytes(request, image)
}

type report struct {
	Calls              int64            `json:"calls"`
	OK                 int64            `json:"ok"`
	Failed             map[string]int64 `json:"failed"`
	Attempts           int64            `json:"attempts"`
	TransparentRetries int64            `json:"transparent_retries"`
	PolicyRetries      int64            `json:"policy_retries"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	imagePath := flag.String("image", "tests/data/flair_256_a.png", "image to classify")
	duration := flag.Duration("duration", 8*time.Second, "how long to keep calling")
	concurrency := flag.Int("concurrency", 16, "callers, each in a closed loop")
	timeout := flag.Duration("timeout", 20*time.Second, "deadline of each call")
	flag.Parse()

	data, err := os.ReadFile(*imagePath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	request := classifyRequest("retry", data)
	counter := &attempts{}
	conn, err := grpc.NewClient(*addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(serviceConfig),
		grpc.WithStatsHandler(counter),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()

	var mu sync.Mutex
	rep := report{Failed: map[string]int64{}}
	stop := time.Now().Add(*duration)
	var wg sync.WaitGroup
	for i := 0; i < *concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				req, reply := request, []byte(nil)
				err := conn.Invoke(ctx, method, &req, &reply)
				cancel()
				mu.Lock()
				rep.Calls++
				if err == nil {
					rep.OK++
				} else {
					s := status.Convert(err)
					msg := s.Message()
					if len(msg) > 120 {
						msg = msg[:120]
					}
					rep.Failed[fmt.Sprintf("%s: %s", s.Code(), msg)]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	rep.Attempts = counter.all.Load()
	rep.TransparentRetries = counter.transparent.Load()
	rep.PolicyRetries = rep.Attempts - rep.Calls - rep.TransparentRetries
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
}

package test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/azure"
	"github.com/openai/openai-go/v3/option"

	"github.com/levee-gw/levee/test/harness"
)

// The official openai-go SDK, unmodified, pointed at Levee: both its OpenAI
// client and its Azure client, for chat (plain and streamed) and embeddings.
func TestOpenAIGoSDK(t *testing.T) {
	env := harness.Start(t, nil)
	clients := map[string]openai.Client{
		"openai": openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(env.APIKey)),
		"azure": openai.NewClient(azure.WithEndpoint(env.BaseURL, "2024-10-21"), azure.WithAPIKey(env.APIKey),
			azure.WithUnsafeAllowHTTP()),
	}
	ctx := context.Background()
	for name, c := range clients {
		t.Run(name, func(t *testing.T) {
			params := openai.ChatCompletionNewParams{
				Model:     "gpt-4o",
				MaxTokens: openai.Int(20),
				Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say hello to the levee.")},
			}
			cc, err := c.Chat.Completions.New(ctx, params)
			if err != nil {
				t.Fatal(err)
			}
			if len(cc.Choices) != 1 || cc.Choices[0].Message.Content == "" || cc.Usage.TotalTokens == 0 {
				t.Fatalf("completion %+v", cc)
			}

			params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
			st := c.Chat.Completions.NewStreaming(ctx, params)
			var acc openai.ChatCompletionAccumulator
			for st.Next() {
				acc.AddChunk(st.Current())
			}
			if err := st.Err(); err != nil {
				t.Fatal(err)
			}
			if acc.Choices[0].Message.Content != cc.Choices[0].Message.Content || acc.Usage.TotalTokens == 0 {
				t.Fatalf("streamed %q (usage %+v), plain %q", acc.Choices[0].Message.Content, acc.Usage, cc.Choices[0].Message.Content)
			}

			emb, err := c.Embeddings.New(ctx, openai.EmbeddingNewParams{
				Model: "text-embedding-3-small",
				Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"a", "b"}},
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(emb.Data) != 2 || len(emb.Data[0].Embedding) == 0 {
				t.Fatalf("embeddings %+v", emb)
			}
		})
	}
	t.Run("errors reach the SDK as typed errors", func(t *testing.T) {
		c := openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey("lv-wrong-key-0000000000"), option.WithMaxRetries(0))
		_, err := c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "gpt-4o",
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("x")}})
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized || apiErr.Code != "invalid_api_key" {
			t.Fatalf("want a 401 invalid_api_key, got %v", err)
		}
		c = openai.NewClient(option.WithBaseURL(env.BaseURL+"/v1/"), option.WithAPIKey(env.APIKey), option.WithMaxRetries(0))
		_, err = c.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "gpt-4o", MaxTokens: openai.Int(1 << 20),
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("x")}})
		if !errors.As(err, &apiErr) || apiErr.StatusCode != 400 || apiErr.Param != "max_tokens" || !strings.Contains(apiErr.Message, "limit") {
			t.Fatalf("want a 400 on max_tokens, got %v", err)
		}
	})
}

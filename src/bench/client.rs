//! One streamed request to an OpenAI-compatible server, timed on the client.

use std::time::Instant;

use futures::StreamExt;
use serde_json::{Value, json};

use super::stats::RequestRecord;
use super::workload::Body;

pub struct Target {
    pub client: reqwest::Client,
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub ignore_eos: bool,
    pub temperature: f64,
    pub logit_bias: Vec<(u32, f64)>,
}

/// What came back, besides the timings: the text (multi-turn sends it back next turn).
pub struct Reply {
    pub record: RequestRecord,
    pub text: String,
}

impl Target {
    fn request_body(&self, body: &Body, max_tokens: usize) -> (String, Value) {
        let mut value = json!({
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.ignore_eos {
            value["ignore_eos"] = json!(true);
        }
        if !self.logit_bias.is_empty() {
            let bias: serde_json::Map<String, Value> =
                self.logit_bias.iter().map(|(id, b)| (id.to_string(), json!(b))).collect();
            value["logit_bias"] = Value::Object(bias);
        }
        let path = match body {
            Body::Completion(prompt) => {
                value["prompt"] = json!(prompt);
                "/v1/completions"
            }
            Body::Chat(messages) => {
                value["messages"] = json!(messages);
                "/v1/chat/completions"
            }
        };
        (format!("{}{path}", self.base_url), value)
    }

    /// Sends one request; `run_start` anchors the record's `start`.
    pub async fn send(&self, body: &Body, max_tokens: usize, prompt_tokens: usize, run_start: Instant) -> Reply {
        let sent = Instant::now();
        let mut record = RequestRecord { start: (sent - run_start).as_secs_f64(), prompt_tokens, ..Default::default() };
        let (url, payload) = self.request_body(body, max_tokens);
        let mut request = self.client.post(url).json(&payload);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                record.error = Some(e.to_string());
                record.e2e = sent.elapsed().as_secs_f64();
                return Reply { record, text: String::new() };
            }
        };
        record.status = response.status().as_u16();
        if !response.status().is_success() {
            record.error = Some(response.text().await.unwrap_or_default());
            record.e2e = sent.elapsed().as_secs_f64();
            return Reply { record, text: String::new() };
        }
        let mut chunk_times = Vec::new();
        let mut text = String::new();
        let mut usage_tokens = None;
        let mut buffer = Vec::new();
        let mut stream = response.bytes_stream();
        'read: while let Some(bytes) = stream.next().await {
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => {
                    record.error = Some(e.to_string());
                    break;
                }
            };
            buffer.extend_from_slice(&bytes);
            while let Some(pos) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:") else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    break 'read;
                }
                let Ok(event) = serde_json::from_str::<Value>(data) else { continue };
                if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(n as usize);
                    if let Some(p) = event["usage"]["prompt_tokens"].as_u64() {
                        record.prompt_tokens = p as usize;
                    }
                }
                let piece = event["choices"][0]["text"]
                    .as_str()
                    .or_else(|| event["choices"][0]["delta"]["content"].as_str())
                    .unwrap_or("");
                if !piece.is_empty() {
                    chunk_times.push(sent.elapsed().as_secs_f64());
                    text.push_str(piece);
                }
            }
        }
        let end = sent.elapsed().as_secs_f64();
        let error = record.error.take();
        let output_tokens = usage_tokens.unwrap_or(chunk_times.len());
        let mut full = RequestRecord::from_stream(record.start, &chunk_times, end, output_tokens, record.prompt_tokens);
        full.status = record.status;
        full.error = error.or_else(|| chunk_times.is_empty().then(|| "no tokens in the stream".to_string()));
        Reply { record: full, text }
    }
}

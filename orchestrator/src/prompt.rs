//! Prompts: conversations rendered with the checkpoint's chat template, tokenized, and checked
//! (image placeholders, prompt limits) the same way for both APIs. The text's size is checked
//! before any rendering or tokenizing, so an oversized prompt costs nothing.

use std::sync::Arc;

use specllava_prompt::chat::{Content, Part};
use specllava_prompt::{ChatTemplate, LlavaTokenizer, Message, PromptError};

use crate::error::OrchestratorError;

/// The size limits of one turn's prompt.
#[derive(Debug, Clone, Copy)]
pub struct PromptLimits {
    /// Most tokens (checked after tokenizing).
    pub max_tokens: usize,
    /// Most bytes of text, all messages together (checked before anything else).
    pub max_bytes: usize,
}

/// Renders and tokenizes prompts. Its methods are CPU work: call them on a blocking thread.
pub struct Prompter {
    tokenizer: Arc<LlavaTokenizer>,
    template: ChatTemplate,
    limits: PromptLimits,
}

fn model_err(e: PromptError) -> OrchestratorError {
    if e.is_invalid_input() {
        OrchestratorError::InvalidArgument(e.to_string())
    } else {
        OrchestratorError::Internal(e.to_string())
    }
}

impl Prompter {
    /// A prompter over the served tokenizer and chat template.
    pub fn new(
        tokenizer: Arc<LlavaTokenizer>,
        template: ChatTemplate,
        limits: PromptLimits,
    ) -> Self {
        Self {
            tokenizer,
            template,
            limits,
        }
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The image placeholder id.
    pub fn image_token_id(&self) -> u32 {
        self.tokenizer.image_token_id()
    }

    /// The ids of a whole conversation followed by the generation prompt (`<s>` first unless
    /// the template writes it); `images` is how many image parts the messages hold.
    pub fn conversation(
        &self,
        messages: &[Message],
        images: usize,
    ) -> Result<Vec<u32>, OrchestratorError> {
        check_prompt_bytes(text_bytes(messages), &self.limits)?;
        let text = self.template.render(messages, true).map_err(model_err)?;
        let bos_in_text = self
            .template
            .tokens()
            .bos_token
            .as_deref()
            .is_some_and(|b| text.starts_with(b));
        let ids = self
            .tokenizer
            .encode(&text, !bos_in_text)
            .map_err(model_err)?;
        self.check(ids, images)
    }

    /// The ids of a follow-up user turn (no image) appended to a history ending with
    /// `last_token`: what the template puts after an answer, the message, the generation
    /// prompt. `</s>` is not repeated when the answer already ends with it.
    pub fn follow_up(&self, last_token: u32, prompt: &str) -> Result<Vec<u32>, OrchestratorError> {
        check_prompt_bytes(prompt.len(), &self.limits)?;
        let text = self
            .template
            .continuation(&Message::user(prompt, false))
            .map_err(model_err)?;
        let mut ids = self
            .tokenizer
            .encode_continuation(&text)
            .map_err(model_err)?;
        let eos = self.tokenizer.eos_token_id();
        if last_token == eos && ids.first() == Some(&eos) {
            ids.remove(0);
        }
        self.check(ids, 0)
    }

    /// Checks the placeholders and the length of a prompt.
    fn check(&self, ids: Vec<u32>, images: usize) -> Result<Vec<u32>, OrchestratorError> {
        let image_id = self.tokenizer.image_token_id();
        let placeholders = ids.iter().filter(|&&t| t == image_id).count();
        if placeholders != images {
            // `<image>` typed in the text would desynchronise images and placeholders.
            return Err(OrchestratorError::InvalidArgument(format!(
                "the prompt has {placeholders} image placeholders for {images} images (text must \
                 not contain the {} placeholder)",
                self.template.tokens().image_token
            )));
        }
        if ids.len() > self.limits.max_tokens {
            return Err(OrchestratorError::InvalidArgument(format!(
                "prompt of {} tokens exceeds the limit of {}",
                ids.len(),
                self.limits.max_tokens
            )));
        }
        Ok(ids)
    }
}

/// Bytes of text in `messages` (what the prompt byte limit counts).
pub fn text_bytes(messages: &[Message]) -> usize {
    messages
        .iter()
        .map(|m| match &m.content {
            Content::Text(t) => t.len(),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match p {
                    Part::Text { text } => text.len(),
                    Part::Image => 0,
                })
                .sum(),
        })
        .sum()
}

/// Refuses text over the byte limit (before it is rendered or tokenized).
pub fn check_prompt_bytes(bytes: usize, limits: &PromptLimits) -> Result<(), OrchestratorError> {
    if bytes > limits.max_bytes {
        return Err(OrchestratorError::TooLarge(format!(
            "prompt of {bytes} bytes exceeds the limit of {} bytes",
            limits.max_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_bytes_counts_every_text_part() {
        let messages = vec![
            Message {
                role: "system".into(),
                content: Content::Text("abc".into()),
            },
            Message::user("héllo", true),
        ];
        assert_eq!(text_bytes(&messages), 3 + "héllo".len());
    }
}

//! Prompts: conversations rendered with the checkpoint's chat template, tokenized, and checked
//! (image placeholders, prompt limit) the same way for both APIs.

use std::sync::Arc;

use specllava_model::{ChatTemplate, LlavaTokenizer, Message, ModelError};

use crate::error::OrchestratorError;

/// Renders and tokenizes prompts. Its methods are CPU work: call them on a blocking thread.
pub struct Prompter {
    tokenizer: Arc<LlavaTokenizer>,
    template: ChatTemplate,
    max_prompt_tokens: usize,
}

fn model_err(e: ModelError) -> OrchestratorError {
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
        max_prompt_tokens: usize,
    ) -> Self {
        Self {
            tokenizer,
            template,
            max_prompt_tokens,
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
    pub fn follow_up(
        &self,
        last_token: Option<u32>,
        prompt: &str,
    ) -> Result<Vec<u32>, OrchestratorError> {
        let text = self
            .template
            .continuation(&Message::user(prompt, false))
            .map_err(model_err)?;
        let mut ids = self
            .tokenizer
            .encode_continuation(&text)
            .map_err(model_err)?;
        let eos = self.tokenizer.eos_token_id();
        if last_token == Some(eos) && ids.first() == Some(&eos) {
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
        if ids.len() > self.max_prompt_tokens {
            return Err(OrchestratorError::InvalidArgument(format!(
                "prompt of {} tokens exceeds the limit of {}",
                ids.len(),
                self.max_prompt_tokens
            )));
        }
        Ok(ids)
    }
}

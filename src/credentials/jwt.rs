//! RS256 JSON Web Tokens signed with a provider-issued RSA private key: the GitHub App JWT and
//! Google's JWT-bearer assertion. The key and the signed token are secrets; neither is logged.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::credentials::value::SourceError;
use crate::secret::Secret;

/// An RSA private key ready to sign.
pub struct SigningKey(RsaKeyPair);

impl SigningKey {
    /// Reads a PEM RSA key: PKCS#1 (`BEGIN RSA PRIVATE KEY`, as GitHub issues it) or PKCS#8
    /// (`BEGIN PRIVATE KEY`, as Google's key files hold it).
    pub fn from_pem(pem: &str) -> Result<Self, SourceError> {
        let der =
            PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| SourceError::KeyUnusable)?;
        let pair = match &der {
            PrivateKeyDer::Pkcs1(key) => RsaKeyPair::from_der(key.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(key) => RsaKeyPair::from_pkcs8(key.secret_pkcs8_der()),
            _ => return Err(SourceError::KeyUnusable),
        }
        .map_err(|_| SourceError::KeyUnusable)?;
        Ok(Self(pair))
    }

    /// `header.claims.signature`, each base64url without padding.
    /// `kid` names the key to the verifier when the provider issued it an id.
    pub fn sign(
        &self,
        claims: &serde_json::Value,
        kid: Option<&str>,
    ) -> Result<Secret, SourceError> {
        let header = match kid {
            Some(kid) => serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": kid }),
            None => serde_json::json!({ "alg": "RS256", "typ": "JWT" }),
        };
        let header = URL_SAFE_NO_PAD.encode(header.to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let mut signature = vec![0u8; self.0.public().modulus_len()];
        self.0
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| SourceError::KeyUnusable)?;
        Ok(Secret::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_an_rsa_key() {
        assert!(SigningKey::from_pem("not a key").is_err());
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(
            SigningKey::from_pem(&ec).is_err(),
            "an EC key cannot sign RS256"
        );
    }
}

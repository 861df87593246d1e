//! The response type of the server side of `Subscriber.Subscribe`.
//!
//! A delivery's event is a stored record, already protobuf-encoded. The generated
//! `SubscribeResponse` would need it decoded (allocating every string and header) only to
//! encode it again; [`RawSubscribeResponse`] sends the stored bytes as the `Delivery.event`
//! field instead. On the wire it is a `SubscribeResponse`: an embedded message and a bytes
//! field are encoded alike, so clients decode it with the generated types.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::v1;

/// `Delivery.event`'s field number.
const DELIVERY_EVENT: u32 = 7;
/// `SubscribeResponse.delivery`'s field number.
const RESPONSE_DELIVERY: u32 = 1;

/// A `SubscribeResponse` as the server sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawSubscribeResponse {
    /// Any response, as generated.
    Message(v1::SubscribeResponse),
    /// A delivery whose event (`head.event`, which stays `None`) is sent as the encoded bytes
    /// `event`.
    Delivery {
        /// Every field of the delivery but its event.
        head: v1::Delivery,
        /// The encoded `Event`.
        event: Bytes,
    },
}

impl Default for RawSubscribeResponse {
    fn default() -> Self {
        RawSubscribeResponse::Message(v1::SubscribeResponse::default())
    }
}

impl From<v1::SubscribeResponse> for RawSubscribeResponse {
    fn from(message: v1::SubscribeResponse) -> Self {
        RawSubscribeResponse::Message(message)
    }
}

impl RawSubscribeResponse {
    /// The encoded length of a raw delivery's `Delivery` message.
    fn delivery_len(head: &v1::Delivery, event: &Bytes) -> usize {
        head.encoded_len() + encoding::key_len(DELIVERY_EVENT) + encoding::encoded_len_varint(event.len() as u64) + event.len()
    }

    /// The same response in generated form (decoding the event of a raw delivery).
    pub fn into_message(self) -> Result<v1::SubscribeResponse, DecodeError> {
        match self {
            RawSubscribeResponse::Message(m) => Ok(m),
            RawSubscribeResponse::Delivery { mut head, event } => {
                head.event = Some(v1::Event::decode(event)?);
                Ok(v1::SubscribeResponse { response: Some(v1::subscribe_response::Response::Delivery(head)) })
            }
        }
    }
}

impl Message for RawSubscribeResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            RawSubscribeResponse::Message(m) => m.encode_raw(buf),
            RawSubscribeResponse::Delivery { head, event } => {
                encoding::encode_key(RESPONSE_DELIVERY, WireType::LengthDelimited, buf);
                encoding::encode_varint(Self::delivery_len(head, event) as u64, buf);
                head.encode_raw(buf);
                encoding::encode_key(DELIVERY_EVENT, WireType::LengthDelimited, buf);
                encoding::encode_varint(event.len() as u64, buf);
                buf.put_slice(event);
            }
        }
    }

    fn merge_field(&mut self, tag: u32, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        // Decoding (which the server never does) yields the generated form.
        let mut message = std::mem::take(self).into_message()?;
        let merged = message.merge_field(tag, wire_type, buf, ctx);
        *self = RawSubscribeResponse::Message(message);
        merged
    }

    fn encoded_len(&self) -> usize {
        match self {
            RawSubscribeResponse::Message(m) => m.encoded_len(),
            RawSubscribeResponse::Delivery { head, event } => {
                let len = Self::delivery_len(head, event);
                encoding::key_len(RESPONSE_DELIVERY) + encoding::encoded_len_varint(len as u64) + len
            }
        }
    }

    fn clear(&mut self) {
        *self = RawSubscribeResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_delivery_is_the_generated_delivery_on_the_wire() {
        let event = v1::Event {
            id: "e1".into(),
            subject: "case-1".into(),
            recipients: vec!["a".into(), "b".into()],
            data: Bytes::from(vec![9u8; 300]),
            headers: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let head = v1::Delivery {
            delivery_id: 7,
            topic: "t".into(),
            partition: 1,
            offset: 42,
            key: "case-1".into(),
            attempt: 2,
            event: None,
            log_time: Some(prost_types::Timestamp { seconds: 5, nanos: 6 }),
        };
        let generated = v1::SubscribeResponse {
            response: Some(v1::subscribe_response::Response::Delivery(v1::Delivery { event: Some(event.clone()), ..head.clone() })),
        };
        let raw = RawSubscribeResponse::Delivery { head, event: event.encode_to_vec().into() };
        let bytes = raw.encode_to_vec();
        assert_eq!(bytes.len(), raw.encoded_len());
        assert_eq!(v1::SubscribeResponse::decode(&bytes[..]).expect("decodes"), generated);
        assert_eq!(RawSubscribeResponse::decode(&bytes[..]).expect("decodes"), RawSubscribeResponse::Message(generated.clone()));
        assert_eq!(raw.into_message().expect("event decodes"), generated);
        // An empty event is still a present (empty) event.
        let empty = RawSubscribeResponse::Delivery { head: v1::Delivery::default(), event: Bytes::new() };
        let decoded = v1::SubscribeResponse::decode(&empty.encode_to_vec()[..]).expect("decodes");
        assert_eq!(
            decoded.response,
            Some(v1::subscribe_response::Response::Delivery(v1::Delivery { event: Some(v1::Event::default()), ..Default::default() }))
        );
    }
}

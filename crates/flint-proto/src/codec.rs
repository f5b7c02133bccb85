//! The protobuf codec of Flint's services: prost's, except that a request that does not parse
//! (invalid UTF-8 in a string, a truncated field) is the client's error, INVALID_ARGUMENT, rather
//! than INTERNAL.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

/// `tonic_prost::ProstCodec` with parse failures reported as INVALID_ARGUMENT.
#[derive(Debug)]
pub struct FlintCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for FlintCodec<T, U> {
    fn default() -> Self {
        FlintCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for FlintCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = FlintDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        FlintDecoder(self.0.decoder())
    }
}

/// Decodes with prost; a message that does not parse is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct FlintDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for FlintDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src).map_err(|status| {
            if status.code() == tonic::Code::Internal {
                Status::invalid_argument(format!("malformed message: {}", status.message()))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

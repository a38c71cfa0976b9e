//! The `Stream` and `Sink` impls the handle types share.

/// `Stream` for a receiving handle type (a field `inner: Typed<T>`), in the parent.
#[cfg(feature = "executor")]
macro_rules! impl_stream {
    ($handle:ident) => {
        impl<T: serde::Serialize + serde::de::DeserializeOwned> futures::Stream for $handle<T> {
            type Item = Result<T, $crate::channel::ChannelError>;

            fn poll_next(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Self::Item>> {
                $crate::channel::poll_next(&self.inner.end, cx)
            }
        }
    };
}

/// `Sink` for a sending handle type (fields `inner: Typed<T>` and
/// `stream: StreamState`), in the parent.
#[cfg(feature = "executor")]
macro_rules! impl_sink {
    ($handle:ident) => {
        impl<T: serde::Serialize + serde::de::DeserializeOwned> futures::Sink<T> for $handle<T> {
            type Error = $crate::channel::ChannelError;

            fn poll_ready(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                futures::Sink::<T>::poll_flush(self, cx)
            }

            fn start_send(self: std::pin::Pin<&mut Self>, item: T) -> Result<(), Self::Error> {
                let this = self.get_mut();
                $crate::channel::start_send(&this.inner.end, &mut this.stream, &item)
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                let this = self.get_mut();
                $crate::channel::poll_flush(&this.inner.end, &mut this.stream, cx)
            }

            fn poll_close(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                futures::Sink::<T>::poll_flush(self, cx)
            }
        }
    };
}

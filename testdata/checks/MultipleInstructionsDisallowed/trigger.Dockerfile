FROM scratch
CMD ["a"]
CMD ["b"]
